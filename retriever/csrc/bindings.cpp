// nanobind bindings of the drafting core: the only file that knows Python.
// Every array crossing this boundary is 1-D, C-contiguous, with the dtype named here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>


#include "core.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace specdraft;

namespace {

using TokensIn = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Lengths64 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using CalibIn = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;  // [sources, kCalibCells]
template <typename T>
using ArrayOut = nb::ndarray<nb::numpy, T, nb::ndim<1>>;

template <typename T>
ArrayOut<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return ArrayOut<T>(heap->data(), {heap->size()}, owner);
}

using TreeArrays = std::tuple<ArrayOut<int32_t>, ArrayOut<int32_t>, ArrayOut<float>, ArrayOut<uint8_t>>;
using CalibratedArrays =
    std::tuple<ArrayOut<int32_t>, ArrayOut<int32_t>, ArrayOut<float>, ArrayOut<uint8_t>, ArrayOut<int32_t>>;

TreeArrays tree_to_numpy(DraftTree&& t) {
  std::vector<uint8_t> sources(t.sources.begin(), t.sources.end());
  return {to_numpy(std::move(t.tokens)), to_numpy(std::move(t.parents)), to_numpy(std::move(t.scores)),
          to_numpy(std::move(sources))};
}

CalibratedArrays calibrated_to_numpy(DraftTree&& t) {
  auto cells = to_numpy(std::move(t.cells));
  auto [tokens, parents, scores, sources] = tree_to_numpy(std::move(t));
  return {tokens, parents, scores, sources, cells};
}

void check_rows(const CalibIn& calib, const TokensIn& rows, size_t num_sources) {
  if (calib.shape(1) != static_cast<size_t>(kCalibCells))
    throw std::invalid_argument("calib must have " + std::to_string(kCalibCells) + " columns, got " +
                                std::to_string(calib.shape(1)));
  if (rows.shape(0) != num_sources)
    throw std::invalid_argument("rows must have one entry per source (" + std::to_string(num_sources) + "), got " +
                                std::to_string(rows.shape(0)));
  for (size_t i = 0; i < num_sources; ++i)
    if (rows.data()[i] < 0 || static_cast<size_t>(rows.data()[i]) >= calib.shape(0))
      throw std::invalid_argument("rows must index calib's rows, got " + std::to_string(rows.data()[i]));
}

// Nanoseconds of the calling thread's last draft: one entry per index queried (online, then
// corpora), then the tree build. Read with `last_draft_ns()`.
std::vector<int64_t>& thread_draft_ns() {
  thread_local std::vector<int64_t> ns;
  return ns;
}

DraftTree draft_tree(TokensIn context, const std::vector<const OnlineIndex*>& online,
                     const std::vector<SourceConfig>& online_cfg, const std::vector<const CorpusIndex*>& corpora,
                     const std::vector<SourceConfig>& corpus_cfg, int max_nodes, float min_score,
                     const CalibIn* calib, const TokensIn* rows) {
  if (online.size() != online_cfg.size() || corpora.size() != corpus_cfg.size())
    throw std::invalid_argument("each index needs exactly one SourceConfig");
  if (calib) check_rows(*calib, *rows, online.size() + corpora.size());
  std::vector<IndexSource> sources;
  for (size_t i = 0; i < online.size(); ++i) sources.push_back(IndexSource{online[i], nullptr, &online_cfg[i]});
  for (size_t i = 0; i < corpora.size(); ++i) sources.push_back(IndexSource{nullptr, corpora[i], &corpus_cfg[i]});
  for (size_t i = 0; calib && i < sources.size(); ++i) {
    sources[i].calib_row = rows->data()[i];
    sources[i].calib = calib->data() + static_cast<size_t>(rows->data()[i]) * kCalibCells;
  }
  nb::gil_scoped_release release;
  return draft_from(context.data(), context.shape(0), sources, max_nodes, min_score, &thread_draft_ns());
}

using Flat64 = nb::ndarray<double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Flat32 = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Prior32 = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

DraftTree step(Session& session, TokensIn new_tokens, const OnlineIndex* tenant, const OnlineIndex* reference,
               const DraftPlan& plan, Flat64 hits, Flat64 trials, Flat32 table, Prior32 prior, int max_nodes,
               const OnlineIndex* prediction) {
  const size_t size = table.shape(0);
  if (hits.shape(0) != size || trials.shape(0) != size || prior.shape(0) != size)
    throw std::invalid_argument("hits, trials, table and prior must have one length");
  TenantInputs in{tenant, reference,
                  CalibState{hits.data(), trials.data(), table.data(), prior.data(), static_cast<int64_t>(size),
                             plan.prior_strength, plan.decay},
                  prediction};
  return draft_step(session, new_tokens.data(), new_tokens.shape(0), in, plan, max_nodes, &thread_draft_ns());
}

TreeArrays session_draft(Session& session, TokensIn new_tokens, const OnlineIndex* tenant,
                         const OnlineIndex* reference, const DraftPlan& plan, Flat64 hits, Flat64 trials,
                         Flat32 table, Prior32 prior, int max_nodes, const OnlineIndex* prediction) {
  return tree_to_numpy(step(session, new_tokens, tenant, reference, plan, hits, trials, table, prior, max_nodes,
                            prediction));
}

std::pair<nb::bytes, size_t> session_draft_response(Session& session, TokensIn new_tokens, const OnlineIndex* tenant,
                                                   const OnlineIndex* reference, const DraftPlan& plan, Flat64 hits,
                                                   Flat64 trials, Flat32 table, Prior32 prior, int max_nodes,
                                                   const OnlineIndex* prediction) {
  const DraftTree tree = step(session, new_tokens, tenant, reference, plan, hits, trials, table, prior, max_nodes,
                              prediction);
  const std::string wire = encode_draft_response(tree, static_cast<int64_t>(session.tokens().size()));
  return {nb::bytes(wire.data(), wire.size()), tree.tokens.size()};
}

TreeArrays draft(TokensIn context, const std::vector<const OnlineIndex*>& online,
                 const std::vector<SourceConfig>& online_cfg, const std::vector<const CorpusIndex*>& corpora,
                 const std::vector<SourceConfig>& corpus_cfg, int max_nodes, float min_score) {
  return tree_to_numpy(
      draft_tree(context, online, online_cfg, corpora, corpus_cfg, max_nodes, min_score, nullptr, nullptr));
}

CalibratedArrays draft_calibrated(TokensIn context, const std::vector<const OnlineIndex*>& online,
                                  const std::vector<SourceConfig>& online_cfg,
                                  const std::vector<const CorpusIndex*>& corpora,
                                  const std::vector<SourceConfig>& corpus_cfg, CalibIn calib, TokensIn rows,
                                  int max_nodes, float min_score) {
  return calibrated_to_numpy(
      draft_tree(context, online, online_cfg, corpora, corpus_cfg, max_nodes, min_score, &calib, &rows));
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "specdraft drafting core (C++): online and corpus suffix indexes, draft-tree builder.";
  m.attr("SEPARATOR") = kSeparator;
  m.attr("MAX_TOKEN_ID") = kMaxTokenId;

  nb::class_<QueryParams>(m, "QueryParams")
      .def(nb::init<>())
      .def_rw("max_match", &QueryParams::max_match)
      .def_rw("max_depth", &QueryParams::max_depth)
      .def_rw("max_occurrences", &QueryParams::max_occurrences)
      .def_rw("max_nodes", &QueryParams::max_nodes)
      .def_rw("match_exponent", &QueryParams::match_exponent);

  nb::class_<SourceConfig>(m, "SourceConfig")
      .def(nb::init<>())
      .def_rw("params", &SourceConfig::params)
      .def_rw("reliability", &SourceConfig::reliability)
      .def_rw("half_match", &SourceConfig::half_match)
      .def_rw("source_id", &SourceConfig::source_id)
      .def_rw("counted_once", &SourceConfig::counted_once);

  nb::class_<Candidates>(m, "Candidates")
      .def_prop_ro("tokens", [](const Candidates& c) { return to_numpy(std::vector<int32_t>(c.tokens)); }, nb::rv_policy::automatic)
      .def_prop_ro("parents", [](const Candidates& c) { return to_numpy(std::vector<int32_t>(c.parents)); }, nb::rv_policy::automatic)
      .def_prop_ro("mass", [](const Candidates& c) { return to_numpy(std::vector<float>(c.mass)); }, nb::rv_policy::automatic)
      .def_prop_ro("count", [](const Candidates& c) { return to_numpy(std::vector<int32_t>(c.count)); }, nb::rv_policy::automatic)
      .def_ro("root_mass", &Candidates::root_mass)
      .def_ro("match_length", &Candidates::match_length)
      .def_ro("occurrences", &Candidates::occurrences);

  nb::class_<OnlineIndex>(m, "OnlineIndex")
      .def(nb::init<int64_t>(), "token_budget"_a)
      .def("append", [](OnlineIndex& ix, TokensIn t) { ix.append(t.data(), t.shape(0)); }, "tokens"_a)
      .def("end_document", &OnlineIndex::end_document)
      .def("reserve", &OnlineIndex::reserve, "positions"_a)
      .def("extend",
           [](OnlineIndex& ix, TokensIn t, Lengths64 lengths) {
             nb::gil_scoped_release release;
             ix.extend(t.data(), t.shape(0), lengths.data(), lengths.shape(0));
           },
           "tokens"_a, "lengths"_a)
      .def_prop_ro("num_tokens", &OnlineIndex::num_tokens)
      .def_prop_ro("num_documents", &OnlineIndex::num_documents)
      .def_prop_ro("memory_bytes", &OnlineIndex::memory_bytes);

  nb::class_<CorpusIndex>(m, "CorpusIndex")
      .def(nb::init<const std::string&, const std::string&, int64_t, int64_t, int>(), "tokens_path"_a,
           "sa_path"_a, "num_positions"_a, "num_suffixes"_a, "sorted_depth"_a)
      .def_prop_ro("num_positions", &CorpusIndex::num_positions)
      .def_prop_ro("num_suffixes", &CorpusIndex::num_suffixes);

  m.def("build_suffix_array", [](TokensIn tokens, int max_depth) {
          std::vector<uint32_t> sa;
          {
            nb::gil_scoped_release release;
            sa = build_suffix_array(tokens.data(), tokens.shape(0), max_depth);
          }
          return to_numpy(std::move(sa));
        }, "tokens"_a, "max_depth"_a);




  m.def("calib_observe", [](TokensIn tokens, TokensIn parents, TokensIn cells, TokensIn new_tokens,
                            nb::ndarray<double, nb::ndim<1>, nb::c_contig, nb::device::cpu> hits,
                            nb::ndarray<double, nb::ndim<1>, nb::c_contig, nb::device::cpu> trials,
                            nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu> table,
                            nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> prior,
                            double prior_strength, double decay) {
          const size_t n = tokens.shape(0), size = table.shape(0);
          if (parents.shape(0) != n || cells.shape(0) != n)
            throw std::invalid_argument("tokens, parents and cells must have one length");
          if (hits.shape(0) != size || trials.shape(0) != size || prior.shape(0) != size)
            throw std::invalid_argument("hits, trials, table and prior must have one length");
          for (size_t i = 0; i < n; ++i)
            if (parents.data()[i] < -1 || parents.data()[i] >= static_cast<int32_t>(i))
              throw std::invalid_argument("parents[i] must be -1 or in [0, i)");
          calib_observe(tokens.data(), parents.data(), cells.data(), n, new_tokens.data(), new_tokens.shape(0),
                        CalibState{hits.data(), trials.data(), table.data(), prior.data(), static_cast<int64_t>(size),
                                   prior_strength, decay});
        }, "tokens"_a, "parents"_a, "cells"_a, "new_tokens"_a, "hits"_a, "trials"_a, "table"_a, "prior"_a,
        "prior_strength"_a, "decay"_a,
        "One acceptance report: updates hits, trials (float64 [R*C]) and table (float32 [R*C]) in place.");

  m.def("tested_outcomes", [](TokensIn tokens, TokensIn parents, TokensIn new_tokens) {
          if (tokens.shape(0) != parents.shape(0)) throw std::invalid_argument("tokens and parents must have one length");
          for (size_t i = 0; i < parents.shape(0); ++i)
            if (parents.data()[i] < -1 || parents.data()[i] >= static_cast<int32_t>(i))
              throw std::invalid_argument("parents[i] must be -1 or in [0, i)");
          std::vector<int8_t> out(tokens.shape(0));
          tested_outcomes(tokens.data(), parents.data(), tokens.shape(0), new_tokens.data(), new_tokens.shape(0),
                          out.data());
          return to_numpy(std::move(out));
        }, "tokens"_a, "parents"_a, "new_tokens"_a,
        "int8 [n]: 1 accepted, 0 rejected, -1 untested, for a draft followed by new_tokens.");

  m.attr("CALIB_CELLS") = kCalibCells;
  m.def("calib_cell_edges", [](int cell) {
          if (cell < 0 || cell >= kCalibCells) throw std::invalid_argument("cell out of range");
          int e, support;
          float share;
          calib_cell_edges(cell, &e, &share, &support);
          return std::make_tuple(e, share, support);
        }, "cell"_a, "lower edges (e, share, support) of a calibration cell");

  m.def("last_draft_ns", []() { return to_numpy(std::vector<int64_t>(thread_draft_ns())); },
        "int64[inputs + 1]: nanoseconds of this thread's last draft call: each index query (online indexes, "
        "then corpora, in call order), then the tree build; empty before the first call.");
  nb::class_<DraftPlan>(m, "DraftPlan",
      "How every session of a drafter drafts (see core.h); keeps its corpora alive.")
      .def("__init__", [](DraftPlan* p, const SourceConfig& context, const SourceConfig& tenant,
                          const SourceConfig& reference, bool use_context, std::vector<const CorpusIndex*> corpora,
                          std::vector<SourceConfig> corpus, float min_score, bool calibrate, double prior_strength,
                          double decay, const SourceConfig& prediction) {
             if (corpora.size() != corpus.size()) throw std::invalid_argument("each corpus needs exactly one SourceConfig");
             new (p) DraftPlan{context, tenant, reference, prediction, use_context, std::move(corpora),
                               std::move(corpus), min_score, calibrate, prior_strength, decay};
           }, "context"_a, "tenant"_a, "reference"_a, "use_context"_a, "corpora"_a, "corpus_configs"_a,
           "min_score"_a, "calibrate"_a, "prior_strength"_a, "decay"_a, "prediction"_a,
           nb::keep_alive<1, 6>());

  nb::class_<Session>(m, "Session", "One generation's context (prompt + accepted output) and its last draft.")
      .def("__init__", [](Session* s, TokensIn prompt, int64_t max_tokens) {
             new (s) Session(prompt.data(), prompt.shape(0), max_tokens);
           }, "prompt"_a, "max_tokens"_a)
      .def_prop_ro("length", [](const Session& s) { return s.tokens().size(); })
      .def_prop_ro("prompt_length", &Session::prompt_length)
      .def_prop_ro("memory_bytes", [](const Session& s) {
             return s.index().memory_bytes() + static_cast<int64_t>(s.tokens().capacity() * sizeof(int32_t));
           })
      .def("tokens", [](const Session& s, size_t start) {
             const auto& t = s.tokens();
             start = std::min(start, t.size());
             return to_numpy(std::vector<int32_t>(t.begin() + static_cast<std::ptrdiff_t>(start), t.end()));
           }, "start"_a, "int32 [length - start]: the context from position start on")
      .def("keep_verified", &Session::keep_verified, "nodes"_a,
           "Only the best-first prefix of this many nodes of the last draft was verified: the next "
           "report observes those alone (core.h Session::keep_verified).")
      .def_prop_ro("last_nodes", [](const Session& s) { return s.last.tokens.size(); },
                   "Nodes of the last draft the next report will observe.");

  m.def("session_draft", &session_draft, "session"_a, "new_tokens"_a, "tenant"_a.none(), "reference"_a.none(),
        "plan"_a, "hits"_a, "trials"_a, "table"_a, "prior"_a, "max_nodes"_a, "prediction"_a.none() = nb::none(),
        "One drafting step (core.h draft_step): new_tokens (int32) report on the session's last draft to the "
        "calibration (hits, trials float64 and table float32 [R * CALIB_CELLS], updated in place; prior "
        "float32 likewise), extend the context; returns the draft's arrays (as draft). prediction: the "
        "session's predicted output index (its row: the one after the corpora). Holds the GIL.");
  m.def("session_draft_response", &session_draft_response, "session"_a, "new_tokens"_a, "tenant"_a.none(),
        "reference"_a.none(), "plan"_a, "hits"_a, "trials"_a, "table"_a, "prior"_a, "max_nodes"_a,
        "prediction"_a.none() = nb::none(), "session_draft, its draft returned as (bytes of a specdraft.v1.DraftResponse with the tree and the "
        "context length, number of nodes). Holds the GIL.");
  m.attr("TAIL_TOKENS") = kTailTokens;

  // Test-only: the core's pieces one at a time, for the slow references in tests/ and `specdraft fuzz tree`.
  // The service drafts through Session / session_draft alone.
  nb::module_ testing = m.def_submodule("testing", "Test-only pieces of the core (tests and the tree fuzzer).");
  testing.def("query", [](const OnlineIndex& ix, TokensIn ctx, const QueryParams& p) {
                nb::gil_scoped_release release;
                return ix.query(ctx.data(), ctx.shape(0), p);
              }, "index"_a, "context"_a, "params"_a);
  testing.def("query", [](const CorpusIndex& ix, TokensIn ctx, const QueryParams& p) {
                nb::gil_scoped_release release;
                return ix.query(ctx.data(), ctx.shape(0), p);
              }, "index"_a, "context"_a, "params"_a);
  testing.def("find_range", [](const CorpusIndex& ix, TokensIn pat) { return ix.find_range(pat.data(), pat.shape(0)); },
              "index"_a, "pattern"_a);
  testing.def("token", [](const CorpusIndex& ix, int64_t pos) { return ix.token(pos); }, "index"_a, "pos"_a);
  testing.def("suffix", [](const CorpusIndex& ix, int64_t rank) { return ix.suffix(rank); }, "index"_a, "rank"_a);
  testing.def("build_tree", [](const std::vector<std::pair<const Candidates*, SourceConfig>>& sources, int max_nodes,
                         float min_score) {
          std::vector<SourceInput> inputs;
          for (const auto& [c, cfg] : sources) inputs.push_back(source_input(c, cfg));
          return tree_to_numpy(build_tree(inputs, max_nodes, min_score));
        }, "sources"_a, "max_nodes"_a, "min_score"_a);
  testing.def("build_tree_calibrated", [](const std::vector<std::pair<const Candidates*, SourceConfig>>& sources,
                                    CalibIn calib, TokensIn rows, int max_nodes, float min_score) {
          check_rows(calib, rows, sources.size());
          std::vector<SourceInput> inputs;
          for (const auto& [c, cfg] : sources) inputs.push_back(source_input(c, cfg));
          for (size_t i = 0; i < inputs.size(); ++i) {
            inputs[i].calib_row = rows.data()[i];
            inputs[i].calib = calib.data() + static_cast<size_t>(rows.data()[i]) * kCalibCells;
          }
          return calibrated_to_numpy(build_tree(inputs, max_nodes, min_score));
        }, "sources"_a, "calib"_a, "rows"_a, "max_nodes"_a, "min_score"_a,
        "build_tree with calibrated scoring: source i reads row rows[i] of calib float32 [R, CALIB_CELLS]; "
        "also returns each node's flat cell (row * CALIB_CELLS + cell of its best source), int32.");
  testing.def("draft_calibrated", &draft_calibrated, "context"_a, "online"_a, "online_configs"_a, "corpora"_a,
        "corpus_configs"_a, "calib"_a, "rows"_a, "max_nodes"_a, "min_score"_a,
        "draft with calibrated scoring: index i (online, then corpora) reads row rows[i] (int32) of calib "
        "float32 [R, CALIB_CELLS]; returns draft's arrays and the flat cells (int32). Releases the GIL.");
  testing.def("calib_cell", &calib_cell, "e"_a, "share"_a, "support"_a);
  testing.def("draft", &draft, "context"_a, "online"_a, "online_configs"_a, "corpora"_a, "corpus_configs"_a,
        "max_nodes"_a, "min_score"_a,
        "Query every index with the context tail and merge their tries into one draft tree "
        "(token_ids int32, parents int32, scores float32, sources uint8). Releases the GIL.");
}
