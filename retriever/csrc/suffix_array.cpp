// Suffix array by prefix doubling with group refinement (Larsson–Sadakane style).
//
// Symbols: tokens >= 0; kSeparator ends a suffix and is lower than every token. Only
// groups still tied are re-sorted each round, so repetitive corpora converge fast.
// Suffixes equal on their first max_depth symbols (or equal up to a shared separator)
// end in an unspecified but deterministic order.
#include <algorithm>
#include <stdexcept>

#include "core.h"

namespace specdraft {

std::vector<uint32_t> build_suffix_array(const int32_t* tokens, size_t n, int max_depth) {
  if (n >= (1ull << 31)) throw std::invalid_argument("corpus must have fewer than 2^31 positions");
  if (max_depth < 1) throw std::invalid_argument("max_depth must be at least 1");
  std::vector<uint32_t> sa;
  sa.reserve(n);
  for (size_t i = 0; i < n; ++i)
    if (tokens[i] != kSeparator) sa.push_back(static_cast<uint32_t>(i));
  std::sort(sa.begin(), sa.end(), [&](uint32_t a, uint32_t b) {
    return tokens[a] != tokens[b] ? tokens[a] < tokens[b] : a < b;
  });
  // rank[i] = index in sa of the first suffix of i's group; -1 for separators.
  std::vector<int32_t> rank(n, -1);
  std::vector<std::pair<size_t, size_t>> open;  // unsorted groups [begin, end)
  for (size_t g = 0; g < sa.size();) {
    size_t e = g + 1;
    while (e < sa.size() && tokens[sa[e]] == tokens[sa[g]]) ++e;
    for (size_t j = g; j < e; ++j) rank[sa[j]] = static_cast<int32_t>(g);
    if (e - g > 1) open.emplace_back(g, e);
    g = e;
  }
  auto key = [&](uint32_t i, size_t k) -> int32_t { return i + k < n ? rank[i + k] : -1; };
  for (size_t k = 1; k < static_cast<size_t>(max_depth) && !open.empty(); k *= 2) {
    // Sort every tied group and read its keys with the ranks of the last round; only
    // then re-rank, so no group sees another's new ranks within a round.
    std::vector<int32_t> keys;
    for (auto [b, e] : open) {
      std::sort(sa.begin() + b, sa.begin() + e, [&](uint32_t x, uint32_t y) { return key(x, k) < key(y, k); });
      for (size_t j = b; j < e; ++j) keys.push_back(key(sa[j], k));
    }
    std::vector<std::pair<size_t, size_t>> next;
    size_t at = 0;  // offset of the group's keys in `keys`
    for (auto [b, e] : open) {
      for (size_t g = b; g < e;) {
        size_t f = g + 1;
        while (f < e && keys[at + f - b] == keys[at + g - b]) ++f;
        for (size_t j = g; j < f; ++j) rank[sa[j]] = static_cast<int32_t>(g);
        if (f - g > 1) next.emplace_back(g, f);
        g = f;
      }
      at += e - b;
    }
    open.swap(next);
  }
  return sa;
}

}  // namespace specdraft
