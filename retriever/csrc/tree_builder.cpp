// build_tree: merge per-source candidate tries and keep the best nodes.
//
// Each source contributes its 2 * max_nodes heaviest nodes.
//
// Example: source A (conf 0.8) saw "x y" twice and "x z" twice (root mass 4); source B
// (conf 0.5) saw "x y" once (root mass 1). Merged scores: x = 0.8*4/4 + 0.5 = 1 (clipped),
// x>y = 0.8*2/4 + 0.5 = 0.9, x>z = 0.4. With max_nodes 2 the draft is [x, y].
#include <algorithm>
#include <numeric>

#include "core.h"

namespace specdraft {

namespace {

// The k nodes of largest mass (ties: lower index), a subtree: mass never grows along a path.
// Merging only these keeps build_tree cheap; a node outside every source's top 2 * max_nodes
// rarely reaches the merged top max_nodes.
std::vector<bool> top_nodes(const Candidates& c, size_t k) {
  std::vector<bool> keep(c.size(), true);
  if (c.size() <= k) return keep;
  std::vector<int32_t> order(c.size());
  std::iota(order.begin(), order.end(), 0);
  std::nth_element(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    return c.mass[a] != c.mass[b] ? c.mass[a] > c.mass[b] : a < b;
  });
  for (size_t j = k; j < order.size(); ++j) keep[order[j]] = false;
  return keep;
}

}  // namespace

DraftTree build_tree(const std::vector<SourceInput>& sources, int max_nodes, float min_score) {
  Candidates merged;  // mass = score; parents precede children
  std::vector<int32_t> best_source;
  std::vector<float> best_contrib;
  std::vector<int32_t> local;
  for (const SourceInput& s : sources) {
    const Candidates& c = *s.candidates;
    if (c.size() == 0 || c.root_mass <= 0.0f || c.match_length <= 0) continue;
    const float conf = s.reliability * c.match_length / (c.match_length + s.half_match);
    const float scale = conf / c.root_mass;
    const std::vector<bool> keep = top_nodes(c, 2 * static_cast<size_t>(std::max(max_nodes, 0)));
    local.assign(c.size(), -1);
    for (size_t i = 0; i < c.size(); ++i) {
      if (!keep[i] || (c.parents[i] >= 0 && local[c.parents[i]] < 0)) continue;
      const float contrib = scale * c.mass[i];
      const int32_t v = merged.add_child(c.parents[i] < 0 ? -1 : local[c.parents[i]], c.tokens[i], contrib);
      local[i] = v;
      if (static_cast<size_t>(v) == best_source.size()) {
        best_source.push_back(s.source_id);
        best_contrib.push_back(contrib);
      } else if (contrib > best_contrib[v]) {
        best_contrib[v] = contrib;
        best_source[v] = s.source_id;
      }
    }
  }
  const std::vector<int32_t>& tokens = merged.tokens;
  const std::vector<int32_t>& parents = merged.parents;
  std::vector<float>& score = merged.mass;
  // Parents precede children in the merged trie: clip so scores never rise along a path.
  for (size_t v = 0; v < score.size(); ++v)
    score[v] = std::min(score[v], parents[v] < 0 ? 1.0f : score[parents[v]]);
  std::vector<int32_t> order(score.size());
  std::iota(order.begin(), order.end(), 0);
  const size_t keep = std::min<size_t>(order.size(), static_cast<size_t>(std::max(max_nodes, 0)));
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int32_t a, int32_t b) {
    return score[a] != score[b] ? score[a] > score[b] : a < b;
  });
  DraftTree out;
  std::vector<int32_t> position(score.size(), -1);  // merged node -> output index
  for (size_t j = 0; j < keep && score[order[j]] >= min_score; ++j) {
    const int32_t v = order[j];
    position[v] = static_cast<int32_t>(j);
    out.tokens.push_back(tokens[v]);
    out.parents.push_back(parents[v] < 0 ? -1 : position[parents[v]]);
    out.scores.push_back(score[v]);
    out.sources.push_back(best_source[v]);
  }
  return out;
}

}  // namespace specdraft
