// build_tree: merge per-source candidate tries and keep the best nodes.
//
// Each source contributes its ceil(1.25 * max_nodes) heaviest nodes.
//
// Example: source A (conf 0.8) saw "x y" twice and "x z" twice (root mass 4); source B
// (conf 0.5) saw "x y" once (root mass 1). Merged scores: x = 0.8*4/4 + 0.5 = 1 (clipped),
// x>y = 0.8*2/4 + 0.5 = 0.9, x>z = 0.4. With max_nodes 2 the draft is [x, y].
//
// The merged trie lives in flat arrays with an open-addressing (parent, token) -> node
// table; all buffers belong to a per-thread workspace reused across calls, so a draft
// allocates nothing but its output once warm.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "core.h"

namespace specdraft {

namespace {

constexpr uint64_t kEmpty = ~0ull;  // no key: parent + 1 < 2^32 and token < 2^24

// Best-first order as one integer: ascending = score descending, then node ascending
// (scores are >= 0, so their float bits order like them).
uint64_t order_key(float value, int32_t node) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return static_cast<uint64_t>(~bits) << 32 | static_cast<uint32_t>(node);
}

// The merged trie of one build_tree call: parents precede children.
struct MergedTrie {
  std::vector<int32_t> tokens, parents, best_source, best_cell;  // [num_nodes]
  std::vector<float> score, best_contrib;             // [num_nodes]
  std::vector<uint64_t> keys;                         // [capacity] (parent + 1) << 32 | token
  std::vector<int32_t> slots;                         // [capacity] node of keys[i]
  uint64_t mask = 0;
  int shift = 58;
  bool noisy_or = false;  // score holds prod(1 - contrib) instead of sum(contrib)  // 64 - log2(capacity): the slot is the product's top bits

  void reset(size_t max_nodes) {
    tokens.clear(), parents.clear(), best_source.clear(), best_cell.clear(), score.clear(), best_contrib.clear();
    size_t cap = 64;
    for (shift = 58; cap < 2 * max_nodes; --shift) cap *= 2;
    keys.assign(cap, kEmpty);
    slots.resize(cap);
    mask = cap - 1;
  }

  // Find-or-add the child; adds contrib to its score (once: the larger of the two) and tracks
  // the largest contributor.
  int32_t add(int32_t parent, int32_t token, float contrib, int32_t source_id, int32_t cell, bool once) {
    const uint64_t key = (static_cast<uint64_t>(parent + 1) << 32) | static_cast<uint32_t>(token);
    for (uint64_t i = (key * 0x9E3779B97F4A7C15ull) >> shift;; i = (i + 1) & mask) {
      if (keys[i] == key) {
        const int32_t v = slots[i];
        if (once) {  // max(fused, contrib); noisy-OR keeps the complement
          score[v] = noisy_or ? std::min(score[v], 1.0f - contrib) : std::max(score[v], contrib);
        } else if (noisy_or) {
          score[v] *= 1.0f - contrib;
        } else {
          score[v] += contrib;
        }
        if (contrib > best_contrib[v]) best_contrib[v] = contrib, best_source[v] = source_id, best_cell[v] = cell;
        return v;
      }
      if (keys[i] != kEmpty) continue;
      const int32_t v = static_cast<int32_t>(tokens.size());
      keys[i] = key, slots[i] = v;
      tokens.push_back(token), parents.push_back(parent), best_source.push_back(source_id), best_cell.push_back(cell);
      score.push_back(noisy_or ? 1.0f - contrib : contrib), best_contrib.push_back(contrib);
      return v;
    }
  }
};

struct Workspace {
  MergedTrie merged;
  std::vector<int32_t> local;    // [source nodes] source node -> merged node, -1: not merged
  std::vector<uint8_t> keep;     // [source nodes] among the k heaviest
  std::vector<float> masses;     // [source nodes] scratch for the mass threshold
  std::vector<float> prob;       // [source nodes] calibrated: P_s(path to node accepted)
  std::vector<int32_t> depth;    // [source nodes] calibrated: depth (root children: 1)
  std::vector<int32_t> cell;     // [source nodes] calibrated: calibration cell
  std::vector<uint64_t> order;   // [merged nodes] order_key: ascending = best-first
  std::vector<int32_t> position; // [merged nodes] merged node -> output index, -1: not output
};

// The calling thread's workspace (one lookup per call: thread_local access is not free).
__attribute__((noinline)) Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// ws.keep[i] = node i is among the k of largest value (ties: lower index); a subtree, as
// values (mass, path probability) never grow along a path. Merging only these keeps
// build_tree cheap; a node outside every source's top 1.25 * max_nodes rarely reaches the
// merged top max_nodes (MAT on the dev traces is the same to two decimals as with 2x, at ~7 %
// fewer instructions per step).
void top_nodes(const std::vector<float>& value, size_t k, Workspace& ws) {
  const size_t n = value.size();
  ws.keep.assign(n, 1);
  if (n <= k) return;
  if (k == 0) return std::fill(ws.keep.begin(), ws.keep.end(), 0);
  ws.masses.assign(value.begin(), value.end());
  std::nth_element(ws.masses.begin(), ws.masses.begin() + (k - 1), ws.masses.end(), std::greater<float>());
  const float threshold = ws.masses[k - 1];  // the k-th largest mass
  size_t quota = k;  // of the nodes at the threshold, the lowest indices are kept
  for (const float m : value) quota -= m > threshold;
  for (size_t i = 0; i < n; ++i) {
    const float m = value[i];
    ws.keep[i] = m > threshold || (m == threshold && quota > 0 && quota--);
  }
}

void merge_source(const SourceInput& s, size_t k, Workspace& ws) {
  const Candidates& c = *s.candidates;
  if (c.size() == 0 || c.root_mass <= 0.0f || c.match_length <= 0) return;
  const float conf = s.reliability * c.match_length / (c.match_length + s.half_match);
  const float scale = conf / c.root_mass;
  top_nodes(c.mass, k, ws);
  ws.local.assign(c.size(), -1);
  for (size_t i = 0; i < c.size(); ++i) {
    const int32_t parent = c.parents[i];
    if (!ws.keep[i] || (parent >= 0 && ws.local[parent] < 0)) continue;
    ws.local[i] = ws.merged.add(parent < 0 ? -1 : ws.local[parent], c.tokens[i], scale * c.mass[i], s.source_id, -1,
                                s.counted_once);
  }
}

// Calibrated: each node's path probability from the source's table, merged by noisy-OR
// (the merged trie keeps prod_s (1 - P_s); build_tree takes its complement).
void merge_calibrated(const SourceInput& s, size_t k, Workspace& ws) {
  const Candidates& c = *s.candidates;
  if (c.size() == 0 || c.root_mass <= 0.0f || c.match_length <= 0) return;
  const size_t n = c.size();
  ws.prob.resize(n), ws.depth.resize(n), ws.cell.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int32_t p = c.parents[i];
    const float parent_mass = p < 0 ? c.root_mass : c.mass[p];
    ws.depth[i] = p < 0 ? 1 : ws.depth[p] + 1;
    ws.cell[i] = calib_cell(c.match_length + ws.depth[i] - 1, parent_mass > 0 ? c.mass[i] / parent_mass : 0.0f,
                            p < 0 ? c.occurrences : c.count[p]);
    ws.prob[i] = (p < 0 ? 1.0f : ws.prob[p]) * s.calib[ws.cell[i]];
  }
  top_nodes(ws.prob, k, ws);
  ws.local.assign(n, -1);
  for (size_t i = 0; i < n; ++i) {
    const int32_t parent = c.parents[i];
    if (!ws.keep[i] || (parent >= 0 && ws.local[parent] < 0)) continue;
    ws.local[i] = ws.merged.add(parent < 0 ? -1 : ws.local[parent], c.tokens[i],
                                std::min(ws.prob[i], kMaxSourceProb), s.source_id,
                                s.calib_row * kCalibCells + ws.cell[i], s.counted_once);
  }
}

constexpr int kELow[kEBuckets] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49};

int e_bucket(int e) {
  int b = 0;
  while (b + 1 < kEBuckets && e >= kELow[b + 1]) ++b;
  return b;
}

struct EBucketTable {  // e_bucket(e) for e < 49
  int8_t at[49];
  EBucketTable() {
    for (int e = 0; e < 49; ++e) at[e] = static_cast<int8_t>(e_bucket(e));
  }
};
const EBucketTable kEBucketOf;

}  // namespace

int calib_cell(int e, float share, int support) {
  const int eb = e >= 49 ? kEBuckets - 1 : kEBucketOf.at[std::max(e, 0)];
  const int sb = share >= 0.999f ? 4 : std::clamp(static_cast<int>(share * 4.0f), 0, 3);
  const int nb = support <= 1 ? 0 : std::min(4, 32 - __builtin_clz(static_cast<unsigned>(support - 1)));
  return (eb * kShareBins + sb) * kSupportBins + nb;
}

void calib_cell_edges(int cell, int* e_lo, float* share_lo, int* support_lo) {
  static constexpr int kSupportLow[kSupportBins] = {1, 2, 3, 5, 9};
  *support_lo = kSupportLow[cell % kSupportBins];
  *share_lo = static_cast<float>(cell / kSupportBins % kShareBins) * 0.25f;
  *e_lo = kELow[cell / (kSupportBins * kShareBins)];
}

void tested_outcomes(const int32_t* tokens, const int32_t* parents, size_t n, const int32_t* new_tokens,
                     size_t k, int8_t* out) {
  // depth of an accepted node = its index in new_tokens + 1; its children are tested
  // while they lie inside new_tokens (the token at depth d is new_tokens[d - 1]).
  std::vector<int32_t> depth(n, 0);  // accepted nodes only
  for (size_t i = 0; i < n; ++i) {
    const int32_t p = parents[i];
    const int32_t d = p < 0 ? 1 : (out[p] == 1 ? depth[p] + 1 : 0);
    if (d == 0 || static_cast<size_t>(d) > k) {
      out[i] = -1;
      continue;
    }
    out[i] = tokens[i] == new_tokens[d - 1] ? 1 : 0;
    depth[i] = d;
  }
}

void calib_observe(const int32_t* tokens, const int32_t* parents, const int32_t* cells, size_t n,
                   const int32_t* new_tokens, size_t k, const CalibState& st) {
  std::vector<int8_t> outcome(n);
  tested_outcomes(tokens, parents, n, new_tokens, k, outcome.data());
  for (size_t i = 0; i < n; ++i) {
    const int32_t c = cells[i];
    if (outcome[i] < 0 || c < 0 || c >= st.size) continue;
    st.hits[c] = st.hits[c] * st.decay + outcome[i];
    st.trials[c] = st.trials[c] * st.decay + 1.0;
    const double post = (st.hits[c] + st.prior_strength * st.prior[c]) / (st.trials[c] + st.prior_strength);
    st.table[c] = static_cast<float>(std::clamp(post, kMinCalibProb, static_cast<double>(kMaxSourceProb)));
  }
}

DraftTree build_tree(const std::vector<SourceInput>& sources, int max_nodes, float min_score) {
  Workspace& ws = workspace();
  const size_t keep = static_cast<size_t>(std::max(max_nodes, 0));
  const size_t per_source = keep + (keep + 3) / 4;  // 1.25 * keep, rounded up
  size_t bound = 0;  // merged nodes at most
  for (const SourceInput& s : sources) bound += std::min(s.candidates->size(), per_source);
  MergedTrie& m = ws.merged;
  m.reset(bound);
  const bool calibrated = !sources.empty() && sources[0].calib != nullptr;
  m.noisy_or = calibrated;
  for (size_t i = 0; i < sources.size(); ++i) {
    if (calibrated) {
      merge_calibrated(sources[i], per_source, ws);
    } else {
      merge_source(sources[i], per_source, ws);
    }
  }
  std::vector<float>& score = m.score;
  if (calibrated)
    for (float& x : score) x = 1.0f - x;
  // Parents precede children in the merged trie: clip so scores never rise along a path.
  for (size_t v = 0; v < score.size(); ++v)
    score[v] = std::min(score[v], m.parents[v] < 0 ? 1.0f : score[m.parents[v]]);
  ws.order.resize(score.size());
  for (size_t v = 0; v < score.size(); ++v) ws.order[v] = order_key(score[v], static_cast<int32_t>(v));
  const size_t n_best = std::min(keep, score.size());
  if (n_best < score.size()) std::nth_element(ws.order.begin(), ws.order.begin() + n_best, ws.order.end());
  std::sort(ws.order.begin(), ws.order.begin() + n_best);
  DraftTree out;
  size_t n = 0;  // output nodes: the best n_best with score >= min_score
  while (n < n_best && score[static_cast<uint32_t>(ws.order[n])] >= min_score) ++n;
  out.tokens.resize(n), out.parents.resize(n), out.scores.resize(n), out.sources.resize(n), out.cells.resize(n);
  ws.position.assign(score.size(), -1);
  for (size_t j = 0; j < n; ++j) {  // a parent sorts before its children (score ties: lower index)
    const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(ws.order[j]));
    ws.position[v] = static_cast<int32_t>(j);
    out.tokens[j] = m.tokens[v];
    out.parents[j] = m.parents[v] < 0 ? -1 : ws.position[m.parents[v]];
    out.scores[j] = score[v];
    out.sources[j] = m.best_source[v];
    out.cells[j] = m.best_cell[v];
  }
  return out;
}

}  // namespace specdraft
