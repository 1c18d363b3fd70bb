// OnlineIndex: hash chains over a ladder of n-gram lengths on a ring buffer of tokens.
//
// Layout per live position p (slot = p & mask_):
//   ring_[slot]                 token at p (kSeparator ends a document)
//   hash_[slot]                 prefix hash H(p) = H(p-1) * B + token + 1 (mod 2^64)
//   prev_[slot * L + l]         distance to the previous occurrence of the level-l n-gram
//                               ending at p (0 = none)
// Each level has an open-addressing table of {fingerprint, low 32 bits of the latest
// end position}. Stale entries (evicted positions) are detected by position and dropped
// at the next rehash, which rebuilds the tables from the live tokens.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "core.h"

namespace specdraft {
namespace {

constexpr int kLadder[] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32};
constexpr int kNumLevels = sizeof(kLadder) / sizeof(kLadder[0]);
constexpr uint64_t kBase = 0x9E3779B97F4A7C15ull;
constexpr int kMaxChainSteps = 4096;  // per level and query: bounds latency on hash collisions

uint64_t pow_base(int n) {
  uint64_t r = 1;
  for (int i = 0; i < n; ++i) r *= kBase;
  return r;
}

uint64_t mix(uint64_t h) {  // finalizer: spreads the polynomial hash over all bits
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

}  // namespace

struct OnlineIndex::Level {
  int length;
  uint64_t base_pow;                    // kBase^length
  std::vector<uint64_t> slots;          // [capacity] (fingerprint << 32) | pos_low; 0 = empty
  uint64_t used = 0;
};

int32_t Candidates::find_child(int32_t parent, int32_t token) const {
  for (int32_t c = parent < 0 ? root_first_child_ : first_child_[parent]; c >= 0; c = next_sibling_[c])
    if (tokens[c] == token) return c;
  return -1;
}

void Candidates::clear() {
  tokens.clear();
  parents.clear();
  mass.clear();
  count.clear();
  first_child_.clear();
  next_sibling_.clear();
  root_first_child_ = -1;
  root_mass = 0.0f;
  match_length = 0;
  occurrences = 0;
}

int32_t Candidates::add_child(int32_t parent, int32_t token, float m, int max_nodes) {
  const int32_t found = find_child(parent, token);
  if (found >= 0) {
    mass[found] += m;
    ++count[found];
    return found;
  }
  if (static_cast<int64_t>(tokens.size()) >= max_nodes) return -1;
  int32_t& head = parent < 0 ? root_first_child_ : first_child_[parent];
  const int32_t id = static_cast<int32_t>(tokens.size());
  next_sibling_.push_back(head);
  head = id;  // before push_back below: `head` may alias first_child_ storage
  tokens.push_back(token);
  parents.push_back(parent);
  mass.push_back(m);
  count.push_back(1);
  first_child_.push_back(-1);
  return id;
}

void Candidates::add_path(const int32_t* path, size_t n, float m, int max_nodes) {
  int32_t node = -1;
  size_t i = 0;
  for (; i < n; ++i) {  // the part already in the trie
    const int32_t c = find_child(node, path[i]);
    if (c < 0) break;
    mass[c] += m;
    ++count[c];
    node = c;
  }
  const size_t base = tokens.size();
  const size_t room = static_cast<int64_t>(base) < max_nodes ? static_cast<size_t>(max_nodes) - base : 0;
  const size_t fresh = std::min(n - i, room);  // the rest: a new chain, one node per token
  if (fresh == 0) return;
  tokens.insert(tokens.end(), path + i, path + i + fresh);
  mass.resize(base + fresh, m);
  count.resize(base + fresh, 1);
  parents.resize(base + fresh);
  first_child_.resize(base + fresh);
  next_sibling_.resize(base + fresh, -1);
  for (size_t j = 0; j < fresh; ++j) {
    const int32_t id = static_cast<int32_t>(base + j);
    parents[id] = j == 0 ? node : id - 1;
    first_child_[id] = j + 1 < fresh ? id + 1 : -1;
  }
  int32_t& head = node < 0 ? root_first_child_ : first_child_[node];
  next_sibling_[base] = head;  // prepended to its siblings, as add_child does
  head = static_cast<int32_t>(base);
}

OnlineIndex::OnlineIndex(int64_t token_budget) : budget_(token_budget) {
  if (token_budget <= 0) throw std::invalid_argument("token_budget must be positive");
  for (int l = 0; l < kNumLevels; ++l) {
    levels_.push_back(Level{kLadder[l], pow_base(kLadder[l]), std::vector<uint64_t>(64, 0), 0});
  }
  ring_.assign(64, kSeparator);
  hash_.assign(64, 0);
  prev_.assign(64 * kNumLevels, 0);
  mask_ = 63;
}

OnlineIndex::~OnlineIndex() = default;

uint64_t OnlineIndex::ngram_hash(int64_t end_pos, const Level& lv) const {
  // Callers guarantee end_pos - length >= base_ - 1, a position still in the ring.
  const uint64_t before = end_pos - lv.length >= 0 ? hash_[(end_pos - lv.length) & mask_] : 0;
  return mix(hash_[end_pos & mask_] - before * lv.base_pow);
}

void OnlineIndex::grow_ring(int64_t min_capacity) {
  int64_t cap = (mask_ + 1) * 2;
  while (cap < min_capacity) cap *= 2;
  std::vector<int32_t> ring(cap, kSeparator);
  std::vector<uint64_t> hash(cap, 0);
  std::vector<uint32_t> prev(cap * kNumLevels, 0);
  // Keep one position before base_ (a separator) so hashes of the first doc stay valid.
  for (int64_t p = std::max<int64_t>(base_ - 1, 0); p < end_; ++p) {
    ring[p & (cap - 1)] = ring_[p & mask_];
    hash[p & (cap - 1)] = hash_[p & mask_];
    std::copy_n(&prev_[(p & mask_) * kNumLevels], kNumLevels, &prev[(p & (cap - 1)) * kNumLevels]);
  }
  ring_.swap(ring);
  hash_.swap(hash);
  prev_.swap(prev);
  mask_ = cap - 1;
}

void OnlineIndex::table_insert(Level& lv, int lvl, int64_t pos, uint64_t h) {
  const uint64_t fp = (h >> 32) | 1;  // never 0: 0 marks an empty slot
  const uint64_t cap_mask = lv.slots.size() - 1;
  uint64_t i = h & cap_mask;
  uint32_t& prev = prev_[(pos & mask_) * kNumLevels + lvl];
  prev = 0;
  while (true) {
    uint64_t s = lv.slots[i];
    if (s == 0) {
      lv.slots[i] = (fp << 32) | static_cast<uint32_t>(pos);
      ++lv.used;
      return;
    }
    if ((s >> 32) == fp) {
      const int64_t head = full_pos(static_cast<uint32_t>(s));
      if (head >= base_ && head < pos) prev = static_cast<uint32_t>(std::min<int64_t>(pos - head, UINT32_MAX));
      lv.slots[i] = (fp << 32) | static_cast<uint32_t>(pos);
      return;
    }
    i = (i + 1) & cap_mask;
  }
}

int64_t OnlineIndex::full_pos(uint32_t low) const {
  // Positions in tables are within 2^32 of end_: the live window is smaller than that.
  const uint32_t end_low = static_cast<uint32_t>(end_);
  return end_ - static_cast<int64_t>(static_cast<uint32_t>(end_low - low));
}

int64_t OnlineIndex::find_head(const Level& lv, uint64_t h) const {
  const uint64_t fp = (h >> 32) | 1;
  const uint64_t cap_mask = lv.slots.size() - 1;
  for (uint64_t i = h & cap_mask;; i = (i + 1) & cap_mask) {
    uint64_t s = lv.slots[i];
    if (s == 0) return -1;
    if ((s >> 32) == fp) return full_pos(static_cast<uint32_t>(s));
  }
}

void OnlineIndex::rehash(int lvl, int64_t min_positions) {
  Level& lv = levels_[lvl];
  // Grown by push(): room for twice the live positions (+64); reserved: for min_positions
  // inserts before the next doubling (the size push() would have reached, no bigger).
  const uint64_t need = std::max<uint64_t>(static_cast<uint64_t>(live_positions()) * 2 + 64,
                                           static_cast<uint64_t>(std::max<int64_t>(min_positions, 0)) * 2 + 2);
  uint64_t cap = 64;
  while (cap < need) cap *= 2;
  lv.slots.assign(cap, 0);
  lv.used = 0;
  for (int64_t p = base_; p < end_; ++p) insert_level(lvl, p);
}

void OnlineIndex::insert_level(int lvl, int64_t p) {
  Level& lv = levels_[lvl];
  const int64_t start = p - lv.length + 1;
  const int64_t doc_start = open_doc_start_ >= 0 && p >= open_doc_start_ ? open_doc_start_ : doc_start_of(p);
  if (start < doc_start || at(p) == kSeparator) {
    prev_[(p & mask_) * kNumLevels + lvl] = 0;
    return;
  }
  table_insert(lv, lvl, p, ngram_hash(p, lv));
}

int64_t OnlineIndex::doc_start_of(int64_t p) const {
  // Closed documents, newest last; the open document is handled by the caller.
  auto it = std::upper_bound(docs_.begin(), docs_.end(), p,
                             [](int64_t v, const std::pair<int64_t, int64_t>& d) { return v < d.first; });
  if (it == docs_.begin()) return base_;
  return std::prev(it)->first;
}

void OnlineIndex::put(int32_t token) {
  const uint64_t before = end_ > 0 ? hash_[(end_ - 1) & mask_] : 0;
  ring_[end_ & mask_] = token;
  hash_[end_ & mask_] = before * kBase + static_cast<uint64_t>(static_cast<int64_t>(token) + 2);
  ++end_;
}

void OnlineIndex::push(int32_t token) {
  if (end_ - std::max<int64_t>(base_ - 1, 0) + 1 > mask_ + 1) grow_ring();
  const int64_t p = end_;
  put(token);
  if (token == kSeparator) {
    for (int l = 0; l < kNumLevels; ++l) prev_[(p & mask_) * kNumLevels + l] = 0;
    return;
  }
  ++live_tokens_;
  for (int l = 0; l < kNumLevels; ++l) {  // the levels' table slots are random: overlap their misses
    const Level& lv = levels_[l];
    if (p - lv.length + 1 >= base_) __builtin_prefetch(&lv.slots[ngram_hash(p, lv) & (lv.slots.size() - 1)]);
  }
  for (int l = 0; l < kNumLevels; ++l) {
    Level& lv = levels_[l];
    if ((lv.used + 1) * 2 > lv.slots.size()) {
      rehash(l);  // includes position p
    } else {
      insert_level(l, p);
    }
  }
}

void OnlineIndex::reserve(int64_t positions) {
  // Sizes the ring and every level's table once for `positions` more (tokens and separators; at
  // most twice the budget in all), as push() would grow them step by step: a replay of many
  // outputs then inserts each token once instead of again at every doubling.
  if (positions <= 0) return;
  const int64_t want = std::min<int64_t>(live_positions() + positions, 2 * budget_ + 64);
  if (want + 2 > mask_ + 1) grow_ring(want + 2);
  for (int l = 0; l < kNumLevels; ++l) {
    if (static_cast<uint64_t>(want + 1) * 2 > levels_[l].slots.size()) rehash(l, want);
  }
}

void OnlineIndex::append(const int32_t* tokens, size_t n) {
  if (open_doc_start_ < 0) open_doc_start_ = end_;
  for (size_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] > kMaxTokenId) throw std::invalid_argument("token id out of range");
    push(tokens[i]);
  }
}

void OnlineIndex::extend(const int32_t* tokens, size_t n, const int64_t* lengths, size_t num_docs) {
  size_t total = 0;
  for (size_t d = 0; d < num_docs; ++d) {
    if (lengths[d] < 0) throw std::invalid_argument("document lengths must be >= 0");
    total += static_cast<size_t>(lengths[d]);
  }
  if (total != n) throw std::invalid_argument("document lengths must sum to the number of tokens");
  for (size_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] > kMaxTokenId) throw std::invalid_argument("token id out of range");
  const int64_t positions = static_cast<int64_t>(n + num_docs);
  if (open_doc_start_ >= 0 || live_tokens_ + static_cast<int64_t>(n) > budget_) {
    // An open document or an eviction on the way: one document at a time, exactly as the live path.
    reserve(positions);
    const int32_t* t = tokens;
    for (size_t d = 0; d < num_docs; ++d) {
      append(t, static_cast<size_t>(lengths[d]));
      end_document();
      t += lengths[d];
    }
    return;
  }
  // Room for all of them first (invisible to queries: growing and rehashing keep every live chain).
  const int64_t ring_need = end_ + positions - std::max<int64_t>(base_ - 1, 0) + 1;
  if (ring_need > mask_ + 1) grow_ring(ring_need);
  for (int l = 0; l < kNumLevels; ++l) {
    if ((levels_[l].used + positions + 1) * 2 > levels_[l].slots.size()) rehash(l, live_positions() + positions);
  }
  const int64_t first = end_;
  const int32_t* t = tokens;
  for (size_t d = 0; d < num_docs; ++d) {  // tokens, prefix hashes and documents first
    const int64_t start = end_;
    for (int64_t i = 0; i < lengths[d]; ++i) put(t[i]);
    t += lengths[d];
    live_tokens_ += lengths[d];
    docs_.emplace_back(start, end_);
    put(kSeparator);
  }
  extend_levels(first);
}

void OnlineIndex::extend_levels(int64_t first) {
  // Level by level, positions in order: each level's table and prev_ column only see their own
  // inserts, so the result equals push()'s interleaved order (tables sized: no rehash in between).
  constexpr int kAhead = 8;  // prefetch distance (positions)
  for (int l = 0; l < kNumLevels; ++l) {
    Level& lv = levels_[l];
    const uint64_t cap_mask = lv.slots.size() - 1;
    int64_t doc_start = first;
    for (int64_t p = first; p < end_; ++p) {
      const int64_t q = p + kAhead;
      if (q < end_ && q - lv.length + 1 >= first) __builtin_prefetch(&lv.slots[ngram_hash(q, lv) & cap_mask]);
      if (at(p) == kSeparator) {
        prev_[(p & mask_) * kNumLevels + l] = 0;
        doc_start = p + 1;
      } else if (p - lv.length + 1 < doc_start) {
        prev_[(p & mask_) * kNumLevels + l] = 0;
      } else {
        table_insert(lv, l, p, ngram_hash(p, lv));  // sized by extend(): at most half full
      }
    }
  }
}

void OnlineIndex::end_document() {
  if (open_doc_start_ < 0) return;
  docs_.emplace_back(open_doc_start_, end_);
  open_doc_start_ = -1;
  push(kSeparator);
  evict_over_budget();
}

void OnlineIndex::evict_over_budget() {
  while (live_tokens_ > budget_ && !docs_.empty()) {
    auto [start, stop] = docs_.front();
    docs_.pop_front();
    live_tokens_ -= stop - start;
    base_ = stop + 1;  // past the document's separator
  }
}

int64_t OnlineIndex::memory_bytes() const {
  int64_t total = static_cast<int64_t>(ring_.capacity() * sizeof(int32_t) + hash_.capacity() * sizeof(uint64_t) +
                                       prev_.capacity() * sizeof(uint32_t));
  for (const Level& lv : levels_) total += static_cast<int64_t>(lv.slots.capacity() * sizeof(uint64_t));
  total += static_cast<int64_t>(docs_.size() * sizeof(std::pair<int64_t, int64_t>));
  return total + static_cast<int64_t>(sizeof(*this));
}

int OnlineIndex::match_length(int64_t end_pos, const int32_t* context, size_t n, int cap) const {
  int m = 0;
  while (m < cap && static_cast<size_t>(m) < n && end_pos - m >= base_) {
    const int32_t t = at(end_pos - m);
    if (t == kSeparator || t != context[n - 1 - m]) break;
    ++m;
  }
  return m;
}

void OnlineIndex::query(const int32_t* context, size_t n, const QueryParams& p, Candidates& out) const {
  out.clear();
  if (n == 0 || live_tokens_ == 0) return;
  std::vector<int64_t> found;
  found.reserve(p.max_occurrences);
  uint64_t ctx_hash = 0;  // hash of the last L context tokens, built incrementally
  std::vector<uint64_t> ctx_prefix(std::min<size_t>(n, kLadder[kNumLevels - 1]) + 1, 0);
  const size_t tail = ctx_prefix.size() - 1;
  for (size_t i = 0; i < tail; ++i)
    ctx_prefix[i + 1] = ctx_prefix[i] * kBase + static_cast<uint64_t>(static_cast<int64_t>(context[n - tail + i]) + 2);
  for (int l = kNumLevels - 1; l >= 0 && static_cast<int>(found.size()) < p.max_occurrences; --l) {
    const Level& lv = levels_[l];
    if (static_cast<size_t>(lv.length) > tail || lv.length > p.max_match) continue;
    ctx_hash = mix(ctx_prefix[tail] - ctx_prefix[tail - lv.length] * lv.base_pow);
    int64_t pos = find_head(lv, ctx_hash);
    for (int steps = 0; pos >= base_ && pos < end_ && steps < kMaxChainSteps; ++steps) {
      if (static_cast<int>(found.size()) >= p.max_occurrences) break;
      const bool has_next = pos + 1 < end_ && at(pos + 1) != kSeparator;
      if (has_next && match_length(pos, context, n, lv.length) == lv.length &&
          std::find(found.begin(), found.end(), pos) == found.end()) {
        found.push_back(pos);
      }
      const uint32_t d = prev_[(pos & mask_) * kNumLevels + l];
      if (d == 0) break;
      pos -= d;
    }
  }
  std::vector<std::pair<int, int64_t>> weighted;  // (match length, end position)
  for (int64_t pos : found) weighted.emplace_back(match_length(pos, context, n, p.max_match), pos);
  // Longest matches first (stable: most recent first among equals), so the node cap
  // keeps the most predictive paths; later occurrences still add mass to kept nodes.
  std::stable_sort(weighted.begin(), weighted.end(), [](auto a, auto b) { return a.first > b.first; });
  std::vector<int32_t> path;  // [<= max_depth] the continuation after one occurrence
  path.reserve(std::max(p.max_depth, 0));
  for (auto [m, pos] : weighted) {
    const float w = std::pow(static_cast<float>(m), p.match_exponent);
    out.match_length = std::max(out.match_length, m);
    out.root_mass += w;
    ++out.occurrences;
    path.clear();
    for (int64_t q = pos + 1; q < end_ && q <= pos + p.max_depth && at(q) != kSeparator; ++q) path.push_back(at(q));
    out.add_path(path.data(), path.size(), w, p.max_nodes);
  }
}

}  // namespace specdraft
