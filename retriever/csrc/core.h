// specdraft drafting core: index structures and the draft-tree builder.
//
// Pure C++17, no Python types: bindings.cpp is the only file that knows nanobind.
// Token ids are int32 in [0, 2^24 - 1); kSeparator (-1) ends a document and never
// matches or continues. Positions are int64 in memory, uint32 on disk.
#pragma once

#include <cstddef>
#include <climits>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace specdraft {

constexpr int32_t kSeparator = -1;
constexpr int32_t kMaxTokenId = (1 << 24) - 2;  // 0xFFFFFF is the on-disk separator

// Knobs of one source query. Depth and match caps are in tokens.
struct QueryParams {
  int max_match = 64;          // longest context suffix considered
  int max_depth = 64;          // longest continuation read after a match
  int max_occurrences = 32;    // occurrences gathered (online) / children sampled (corpus)
  int max_nodes = 256;         // nodes of the candidate trie (longest matches kept first)
  float match_exponent = 2.0f; // online: occurrence weight = match_length ^ exponent
};

// A continuation trie from one source: the tokens seen after the context's suffix
// matches, with the (weighted) number of occurrences through each node.
// Invariant: parents[i] == -1 or parents[i] < i; mass[child] <= mass[parent].
struct Candidates {
  std::vector<int32_t> tokens;   // [num_nodes]
  std::vector<int32_t> parents;  // [num_nodes]
  std::vector<float> mass;       // [num_nodes]
  std::vector<int32_t> count;    // [num_nodes] occurrences through the node (unweighted)
  float root_mass = 0.0f;        // mass of all occurrences that have a continuation
  int32_t match_length = 0;      // longest suffix match found (0: none)
  int32_t occurrences = 0;       // occurrences contributing

  // Find-or-add the child and add m to its mass; -1 when it would be node max_nodes + 1.
  int32_t add_child(int32_t parent, int32_t token, float m, int max_nodes = INT32_MAX);
  int32_t find_child(int32_t parent, int32_t token) const;  // -1: none
  // add_child along path[0:n] from the root, stopping where add_child would return -1.
  void add_path(const int32_t* path, size_t n, float m, int max_nodes = INT32_MAX);
  size_t size() const { return tokens.size(); }
  int32_t first_child(int32_t node) const { return node < 0 ? root_first_child_ : first_child_[node]; }  // -1: none
  int32_t next_sibling(int32_t node) const { return next_sibling_[node]; }  // -1: none
  void clear();  // empty, keeping the capacity (query buffers are reused across calls)

 private:
  std::vector<int32_t> first_child_;   // [num_nodes] -1 = leaf
  std::vector<int32_t> next_sibling_;  // [num_nodes] -1 = last
  int32_t root_first_child_ = -1;
};

// Online index over a growing token log split into documents: hash chains over the
// n-grams of a fixed ladder of lengths. Appends are O(ladder) per token; the oldest
// documents are evicted whole once live tokens exceed the budget (memory stays flat).
// Not thread-safe: the caller serializes access.
class OnlineIndex {
 public:
  explicit OnlineIndex(int64_t token_budget);
  ~OnlineIndex();
  OnlineIndex(const OnlineIndex&) = delete;
  OnlineIndex& operator=(const OnlineIndex&) = delete;
  void append(const int32_t* tokens, size_t n);  // to the open document
  void end_document();                           // close it; evict over budget
  void reserve(int64_t positions);               // room for this many more positions (tokens + separators)
  // Each of `num_docs` documents (lengths[i] tokens, concatenated in `tokens`) appended and ended, as
  // append + end_document per document would, but level by level (one table hot at a time) when
  // nothing is evicted meanwhile. Throws std::invalid_argument, index unchanged, on a bad id or length.
  void extend(const int32_t* tokens, size_t n, const int64_t* lengths, size_t num_docs);
  void query(const int32_t* context, size_t n, const QueryParams& p, Candidates& out) const;  // clears out
  Candidates query(const int32_t* context, size_t n, const QueryParams& p) const {
    Candidates out;
    query(context, n, p, out);
    return out;
  }

  int64_t num_tokens() const { return live_tokens_; }        // excluding separators
  int64_t num_documents() const { return static_cast<int64_t>(docs_.size()); }
  int64_t memory_bytes() const;

 private:
  struct Level;
  int32_t at(int64_t pos) const { return ring_[pos & mask_]; }
  int64_t live_positions() const { return end_ - base_; }
  void push(int32_t token);
  void put(int32_t token);  // token and its prefix hash at end_, then ++end_ (the ring has room)
  void grow_ring(int64_t min_capacity = 0);
  void evict_over_budget();
  void rehash(int lvl, int64_t min_positions = 0);
  void insert_level(int lvl, int64_t pos);
  void extend_levels(int64_t first);  // every level for positions [first, end_) of closed docs
  void table_insert(Level& lv, int lvl, int64_t pos, uint64_t h);
  uint64_t ngram_hash(int64_t end_pos, const Level& lv) const;
  int64_t find_head(const Level& lv, uint64_t h) const;
  int64_t full_pos(uint32_t low) const;
  int64_t doc_start_of(int64_t pos) const;
  int match_length(int64_t end_pos, const int32_t* context, size_t n, int cap) const;

  int64_t budget_;
  std::vector<int32_t> ring_;          // [capacity] tokens by position & mask_
  std::vector<uint64_t> hash_;         // [capacity] prefix hashes by position & mask_
  std::vector<uint32_t> prev_;         // [capacity * levels] chain deltas (0 = end)
  int64_t mask_ = 0;
  int64_t base_ = 0;                   // first live position
  int64_t end_ = 0;                    // one past the last position
  int64_t live_tokens_ = 0;
  int64_t open_doc_start_ = -1;        // -1: no open document
  std::deque<std::pair<int64_t, int64_t>> docs_;  // [start, end) of closed docs
  std::vector<Level> levels_;
};

// Static corpus index: token array (24-bit on disk) + suffix array (uint32), both
// memory-mapped read-only. Suffixes are sorted on their first `sorted_depth` tokens.
class CorpusIndex {
 public:
  // Raises std::runtime_error with a precise message on any size mismatch.
  CorpusIndex(const std::string& tokens_path, const std::string& sa_path,
              int64_t num_positions, int64_t num_suffixes, int sorted_depth);
  ~CorpusIndex();
  CorpusIndex(const CorpusIndex&) = delete;
  CorpusIndex& operator=(const CorpusIndex&) = delete;

  void query(const int32_t* context, size_t n, const QueryParams& p, Candidates& out) const;  // clears out
  Candidates query(const int32_t* context, size_t n, const QueryParams& p) const {
    Candidates out;
    query(context, n, p, out);
    return out;
  }
  int32_t token(int64_t pos) const {  // kSeparator at doc ends and past the end
    if (pos < 0 || pos >= num_positions_) return kSeparator;
    const uint8_t* b = tokens_ + pos * 3;
    const int32_t t = b[0] | (b[1] << 8) | (b[2] << 16);
    return t == 0xFFFFFF ? kSeparator : t;
  }
  int64_t suffix(int64_t rank) const;  // position of the rank-th smallest suffix
  int64_t num_positions() const { return num_positions_; }
  int64_t num_suffixes() const { return num_suffixes_; }
  // [lo, hi) of suffix ranks whose first n tokens equal pattern.
  std::pair<int64_t, int64_t> find_range(const int32_t* pattern, size_t n) const;

 private:
  static constexpr int kMaxPrefetchSamples = 64;  // sampled continuations prefetched up front
  void prefetch_rank(int64_t first, int64_t count) const;
  template <typename Below>
  void search(int k, int64_t* first, int64_t* count, Below below) const;  // k binary searches at once
  int64_t range_end(int64_t lo, const int32_t* pattern, size_t n) const;  // lo matches; first rank past
  int longest_match(const int32_t* context, size_t n, int cap, int64_t* lo) const;  // length, *lo its rank
  // Tokens from start (>= 0) up to a separator, at most max_len, into out; returns how many.
  size_t read_until_separator(int64_t start, size_t max_len, int32_t* out) const;

  const uint8_t* tokens_ = nullptr;
  const uint32_t* sa_ = nullptr;
  size_t tokens_bytes_ = 0, sa_bytes_ = 0;
  int64_t num_positions_, num_suffixes_;
  int sorted_depth_;
  // [max token id + 2] first rank of the suffixes starting with each token id (the suffix
  // array sorts by first token): a search starts inside its first token's bucket.
  std::vector<uint32_t> bucket_;
  void build_buckets();
  std::pair<int64_t, int64_t> bucket(int32_t token) const {
    if (token < 0) return {0, 0};
    if (static_cast<size_t>(token) + 1 >= bucket_.size()) return {num_suffixes_, num_suffixes_};
    return {bucket_[token], bucket_[token + 1]};
  }
};

// Suffix array of the non-separator positions of tokens[0:n], sorted by their first
// max_depth tokens (a separator ends a suffix and sorts before every token; ties
// broken by position). O(n log max_depth) expected.
std::vector<uint32_t> build_suffix_array(const int32_t* tokens, size_t n, int max_depth);

// Calibrated scoring: a node's acceptance probability given its parent's is looked up in
// a per-source table of kCalibCells cells, indexed by (e, share, support): e = match length
// + depth - 1 (context tokens the occurrence agrees with before the node), share = the
// node's mass over its parent's (root: root_mass), support = occurrences through the parent.
constexpr int kEBuckets = 12;       // e: 1, 2, 3, 4, 5-6, 7-8, 9-12, 13-16, 17-24, 25-32, 33-48, 49+
constexpr int kShareBins = 5;       // share: [0, .25), [.25, .5), [.5, .75), [.75, 1), 1
constexpr int kSupportBins = 5;     // support: 1, 2, 3-4, 5-8, 9+
constexpr int kCalibCells = kEBuckets * kShareBins * kSupportBins;
int calib_cell(int e, float share, int support);  // in [0, kCalibCells)
// Lower edges of each cell's buckets (e, share, support), for priors built elsewhere.
void calib_cell_edges(int cell, int* e_lo, float* share_lo, int* support_lo);

// One source's contribution to a draft.
struct SourceInput {
  const Candidates* candidates;
  float reliability;  // r_s: scales the source's confidence
  float half_match;   // k_s: confidence = r_s * m / (m + k_s), m = match length
  int32_t source_id;
  const float* calib = nullptr;  // [kCalibCells] P(node | parent) per cell; null: heuristic score
  int32_t calib_row = 0;         // reported cells are calib_row * kCalibCells + cell
  bool counted_once = false;     // see SourceConfig::counted_once
};

// The draft: node i proposes tokens[i] after parents[i] (-1 = after the context).
// Nodes come best-first: scores non-increasing, parents[i] < i.
struct DraftTree {
  std::vector<int32_t> tokens;   // [num_nodes]
  std::vector<int32_t> parents;  // [num_nodes]
  std::vector<float> scores;     // [num_nodes] estimated P(path accepted)
  std::vector<int32_t> sources;  // [num_nodes] id of the source adding most score
  std::vector<int32_t> cells;    // [num_nodes] calib_row * kCalibCells + cell of that source (-1: heuristic)
};

// Merge the sources' tries into one and keep the max_nodes best nodes with score
// >= min_score. score(v) = min(1, sum_s conf_s * mass_s(v) / root_mass_s).
// With calib set on every source instead: a source's path probability P_s(v) = P_s(parent)
// * calib[cell(v)], and score(v) = 1 - prod_s (1 - min(P_s(v), kMaxSourceProb)) (noisy-OR).
// A counted_once source, merged in order, makes a node's score so far max(it, its own
// contribution) instead of adding to it (sum or noisy-OR).
DraftTree build_tree(const std::vector<SourceInput>& sources, int max_nodes, float min_score);
constexpr float kMaxSourceProb = 0.999f;

// Which nodes of a draft the verifier tested and accepted, given the tokens it emitted next
// (accepted draft tokens, then a bonus token): out[i] = 1 accepted, 0 rejected, -1 not
// tested (its parent was not accepted, or lies at the end of new_tokens).
void tested_outcomes(const int32_t* tokens, const int32_t* parents, size_t n, const int32_t* new_tokens,
                     size_t k, int8_t* out);

// A calibration table and its Beta evidence, flat [size] = [rows * kCalibCells].
struct CalibState {
  double* hits;        // decayed accepted counts
  double* trials;      // decayed tested counts
  float* table;        // posterior means, clipped to [kMinCalibProb, kMaxSourceProb]
  const float* prior;  // prior means
  int64_t size;
  double prior_strength, decay;
};
constexpr double kMinCalibProb = 1e-4;

// Each tested node of a draft (cells[i]: its flat cell, -1 none) is one observation of its
// cell: hits = hits * decay + accepted, trials = trials * decay + 1 (each cell forgets per
// observation of its own), and the cell's table entry becomes
// (hits + prior_strength * prior) / (trials + prior_strength).
void calib_observe(const int32_t* tokens, const int32_t* parents, const int32_t* cells, size_t n,
                   const int32_t* new_tokens, size_t k, const CalibState& st);

// ---------------------------------------------------------------- drafting (drafting.cpp)

// One source's knobs: how it is queried and, for heuristic scoring, trusted.
struct SourceConfig {
  QueryParams params;
  float reliability = 1.0f;
  float half_match = 1.0f;
  int32_t source_id = 0;
  // Not an independent witness of what the sources before it propose (the session's prediction
  // mostly repeats the prompt, so it and the context propose the same text): where it proposes a
  // node they proposed, the node keeps the larger of the two scores instead of their sum /
  // noisy-OR. Its own nodes score as any source's.
  bool counted_once = false;
};

// A source's candidates and config as build_tree takes them (calib: its table row, null: heuristic).
inline SourceInput source_input(const Candidates* candidates, const SourceConfig& cfg, const float* calib = nullptr,
                                int32_t calib_row = 0) {
  return SourceInput{candidates, cfg.reliability, cfg.half_match, cfg.source_id, calib, calib_row, cfg.counted_once};
}

// One index to query for a draft: exactly one of online / corpus is set. calib: that
// source's row of a calibration table ([kCalibCells]; null on every source: heuristic).
struct IndexSource {
  const OnlineIndex* online = nullptr;
  const CorpusIndex* corpus = nullptr;
  const SourceConfig* config = nullptr;
  const float* calib = nullptr;
  int32_t calib_row = 0;
};

// Query every source with the context's tail (context[0:n]) and build_tree over their
// tries. lookup_ns (if set) becomes [sources + 1]: the nanoseconds of each query, then
// of the build. The tries live in a per-thread workspace reused across calls.
DraftTree draft_from(const int32_t* context, size_t n, const std::vector<IndexSource>& sources, int max_nodes,
                     float min_score, std::vector<int64_t>* lookup_ns);

// Calibration rows of the sources of a session step (corpus i: kCorpusRow + i; the session's
// prediction, when it has one: the row after the corpora, kCorpusRow + corpora).
constexpr int32_t kContextRow = 0, kTenantRow = 1, kReferenceRow = 2, kCorpusRow = 3;
constexpr int kTailTokens = 64;  // context tokens a step queries with: the longest match considered

// How every session of one drafter drafts: the sources' configs, the corpora, the score
// floor and the calibration's update rule. The corpora must outlive the plan.
struct DraftPlan {
  SourceConfig context, tenant, reference;
  SourceConfig prediction;  // the session's predicted output (OpenAI Predicted Outputs), when given
  bool use_context = true;
  std::vector<const CorpusIndex*> corpora;  // [corpora]
  std::vector<SourceConfig> corpus;         // [corpora]
  float min_score = 0.0f;
  bool calibrate = true;
  double prior_strength = 4.0, decay = 0.99;
};

// One generation: its context (prompt + accepted output, int32) indexed for matching, and
// its last draft (tokens, parents, cells), which the next step's new tokens report on.
// Not thread-safe.
class Session {
 public:
  Session(const int32_t* prompt, size_t n, int64_t max_tokens);
  void extend(const int32_t* tokens, size_t n);
  const std::vector<int32_t>& tokens() const { return tokens_; }  // [length]
  size_t prompt_length() const { return prompt_length_; }
  const OnlineIndex& index() const { return index_; }
  // The verifier tested only the best-first prefix of `last` of this many nodes (a tree: parents
  // precede children): the rest is dropped, so the next report neither counts them as
  // rejections nor as hits. A count >= the draft's size keeps it whole.
  void keep_verified(size_t nodes);
  DraftTree last;  // tokens, parents and cells of the last draft (empty: none to report on)

 private:
  OnlineIndex index_;
  std::vector<int32_t> tokens_;
  size_t prompt_length_;
};

// The tenant's part of a step: its prior outputs' index, the session's reference set (null:
// none), the session's prediction (null: none) and its calibration table (table/hits/trials/prior
// of [rows * kCalibCells]; with plan.calibrate, rows must cover kCorpusRow + corpora, plus one
// for the prediction when it is set).
struct TenantInputs {
  const OnlineIndex* tenant = nullptr;
  const OnlineIndex* reference = nullptr;
  CalibState calib{};
  const OnlineIndex* prediction = nullptr;
};

// One drafting step: new_tokens[0:k] (accepted since the last draft) first report on the
// session's last draft to the calibration (plan.calibrate), then extend the context; the
// draft comes from the context tail, the tenant's indexes and the corpora, and becomes the
// session's last draft; max_nodes <= 0 reports and extends only (empty draft, no query).
// Example: a session over "a b c a b" with k = 0 drafts "c a b" from its own context (the
// earlier "a b" continued with "c").
DraftTree draft_step(Session& session, const int32_t* new_tokens, size_t k, const TenantInputs& tenant,
                     const DraftPlan& plan, int max_nodes, std::vector<int64_t>* lookup_ns);

// ---------------------------------------------------------------- wire format (wire_format.cpp)

// The bytes of a specdraft.v1.DraftResponse: `tree` (always present; packed token_ids,
// parents, scores as float32 and sources) and `context_tokens` (absent when 0).
std::string encode_draft_response(const DraftTree& tree, int64_t context_tokens);

}  // namespace specdraft
