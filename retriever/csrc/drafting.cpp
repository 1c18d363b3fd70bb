// Drafting: query the sources with the context tail and build the tree (draft_from), and
// one session step (draft_step): acceptance report, context extension, draft.
#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "core.h"

namespace specdraft {
namespace {

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The calling thread's buffers, reused across calls (they keep their capacity): the candidate
// tries, a step's source list and the inputs of a tree build.
struct Scratch {
  std::vector<Candidates> found;
  std::vector<IndexSource> sources;
  std::vector<SourceInput> inputs;
};

__attribute__((noinline)) Scratch& scratch() {
  thread_local Scratch buffers;
  return buffers;
}

}  // namespace

DraftTree draft_from(const int32_t* context, size_t n, const std::vector<IndexSource>& sources, int max_nodes,
                     float min_score, std::vector<int64_t>* lookup_ns) {
  std::vector<Candidates>& found = scratch().found;
  if (found.size() < sources.size()) found.resize(sources.size());
  std::vector<SourceInput>& inputs = scratch().inputs;
  inputs.clear();
  if (lookup_ns) lookup_ns->assign(sources.size() + 1, 0);
  int64_t t = lookup_ns ? now_ns() : 0;
  for (size_t i = 0; i < sources.size(); ++i) {
    const IndexSource& s = sources[i];
    if (s.online) {
      s.online->query(context, n, s.config->params, found[i]);
    } else {
      s.corpus->query(context, n, s.config->params, found[i]);
    }
    if (lookup_ns) {
      const int64_t t1 = now_ns();
      (*lookup_ns)[i] = t1 - t;
      t = t1;
    }
    inputs.push_back(source_input(&found[i], *s.config, s.calib, s.calib_row));
  }
  DraftTree tree = build_tree(inputs, max_nodes, min_score);
  if (lookup_ns) lookup_ns->back() = now_ns() - t;
  return tree;
}

Session::Session(const int32_t* prompt, size_t n, int64_t max_tokens)
    : index_(max_tokens), tokens_(prompt, prompt + n), prompt_length_(n) {
  index_.append(prompt, n);
}

void Session::extend(const int32_t* tokens, size_t n) {
  index_.append(tokens, n);
  tokens_.insert(tokens_.end(), tokens, tokens + n);
}

void Session::keep_verified(size_t nodes) {
  if (nodes >= last.tokens.size()) return;
  last.tokens.resize(nodes), last.parents.resize(nodes);
  if (last.cells.size() > nodes) last.cells.resize(nodes);
}

DraftTree draft_step(Session& session, const int32_t* new_tokens, size_t k, const TenantInputs& tenant,
                     const DraftPlan& plan, int max_nodes, std::vector<int64_t>* lookup_ns) {
  const CalibState& cal = tenant.calib;
  const int32_t prediction_row = kCorpusRow + static_cast<int32_t>(plan.corpora.size());
  const int64_t rows_needed = (prediction_row + (tenant.prediction ? 1 : 0)) * static_cast<int64_t>(kCalibCells);
  if (plan.calibrate && cal.size < rows_needed)
    throw std::invalid_argument("calibration table must have " + std::to_string(rows_needed) + " cells, got " +
                                std::to_string(cal.size));
  const DraftTree& last = session.last;
  if (plan.calibrate && k > 0 && !last.tokens.empty())
    calib_observe(last.tokens.data(), last.parents.data(), last.cells.data(), last.tokens.size(), new_tokens, k, cal);
  if (k > 0) session.extend(new_tokens, k);
  if (max_nodes <= 0) {  // a report only (e.g. at a session's end): no index is queried
    session.last = DraftTree{};
    if (lookup_ns) lookup_ns->clear();
    return {};
  }

  std::vector<IndexSource>& sources = scratch().sources;
  sources.clear();
  auto row = [&](int32_t r) { return plan.calibrate ? cal.table + static_cast<int64_t>(r) * kCalibCells : nullptr; };
  if (plan.use_context)
    sources.push_back(IndexSource{&session.index(), nullptr, &plan.context, row(kContextRow), kContextRow});
  if (tenant.tenant)
    sources.push_back(IndexSource{tenant.tenant, nullptr, &plan.tenant, row(kTenantRow), kTenantRow});
  if (tenant.reference)
    sources.push_back(IndexSource{tenant.reference, nullptr, &plan.reference, row(kReferenceRow), kReferenceRow});
  for (size_t i = 0; i < plan.corpora.size(); ++i) {
    const int32_t r = kCorpusRow + static_cast<int32_t>(i);
    sources.push_back(IndexSource{nullptr, plan.corpora[i], &plan.corpus[i], row(r), r});
  }
  if (tenant.prediction)
    sources.push_back(IndexSource{tenant.prediction, nullptr, &plan.prediction, row(prediction_row), prediction_row});
  const std::vector<int32_t>& context = session.tokens();
  const size_t tail = std::min<size_t>(context.size(), kTailTokens);
  DraftTree tree = draft_from(context.data() + context.size() - tail, tail, sources, max_nodes, plan.min_score,
                              lookup_ns);
  session.last.tokens = tree.tokens, session.last.parents = tree.parents;  // what the next report needs
  session.last.cells.swap(tree.cells);
  return tree;
}

}  // namespace specdraft
