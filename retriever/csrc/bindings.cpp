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
template <typename T>
using ArrayOut = nb::ndarray<nb::numpy, T, nb::ndim<1>>;

template <typename T>
ArrayOut<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return ArrayOut<T>(heap->data(), {heap->size()}, owner);
}

// One source's knobs as seen from Python.
struct SourceConfig {
  QueryParams params;
  float reliability = 1.0f;
  float half_match = 1.0f;
  int32_t source_id = 0;
};

using TreeArrays = std::tuple<ArrayOut<int32_t>, ArrayOut<int32_t>, ArrayOut<float>, ArrayOut<uint8_t>>;

TreeArrays tree_to_numpy(DraftTree&& t) {
  std::vector<uint8_t> sources(t.sources.begin(), t.sources.end());
  return {to_numpy(std::move(t.tokens)), to_numpy(std::move(t.parents)), to_numpy(std::move(t.scores)),
          to_numpy(std::move(sources))};
}

// The calling thread's candidate tries, reused across draft calls.
__attribute__((noinline)) std::vector<Candidates>& thread_candidates() {
  thread_local std::vector<Candidates> found;
  return found;
}

TreeArrays draft(TokensIn context, const std::vector<const OnlineIndex*>& online,
                 const std::vector<SourceConfig>& online_cfg, const std::vector<const CorpusIndex*>& corpora,
                 const std::vector<SourceConfig>& corpus_cfg, int max_nodes, float min_score) {
  if (online.size() != online_cfg.size() || corpora.size() != corpus_cfg.size())
    throw std::invalid_argument("each index needs exactly one SourceConfig");
  DraftTree tree;
  {
    nb::gil_scoped_release release;
    const int32_t* ctx = context.data();
    const size_t n = context.shape(0);
    std::vector<Candidates>& found = thread_candidates();  // reused: the tries keep their capacity
    found.resize(std::max(found.size(), online.size() + corpora.size()));
    std::vector<SourceInput> inputs;
    inputs.reserve(online.size() + corpora.size());
    for (size_t i = 0; i < online.size(); ++i) {
      online[i]->query(ctx, n, online_cfg[i].params, found[i]);
      inputs.push_back(SourceInput{&found[i], online_cfg[i].reliability, online_cfg[i].half_match,
                                   online_cfg[i].source_id});
    }
    for (size_t i = 0; i < corpora.size(); ++i) {
      Candidates& c = found[online.size() + i];
      corpora[i]->query(ctx, n, corpus_cfg[i].params, c);
      inputs.push_back(SourceInput{&c, corpus_cfg[i].reliability, corpus_cfg[i].half_match, corpus_cfg[i].source_id});
    }
    tree = build_tree(inputs, max_nodes, min_score);
  }
  return tree_to_numpy(std::move(tree));
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
      .def_rw("source_id", &SourceConfig::source_id);

  nb::class_<Candidates>(m, "Candidates")
      .def_prop_ro("tokens", [](const Candidates& c) { return to_numpy(std::vector<int32_t>(c.tokens)); }, nb::rv_policy::automatic)
      .def_prop_ro("parents", [](const Candidates& c) { return to_numpy(std::vector<int32_t>(c.parents)); }, nb::rv_policy::automatic)
      .def_prop_ro("mass", [](const Candidates& c) { return to_numpy(std::vector<float>(c.mass)); }, nb::rv_policy::automatic)
      .def_ro("root_mass", &Candidates::root_mass)
      .def_ro("match_length", &Candidates::match_length)
      .def_ro("occurrences", &Candidates::occurrences);

  nb::class_<OnlineIndex>(m, "OnlineIndex")
      .def(nb::init<int64_t>(), "token_budget"_a)
      .def("append", [](OnlineIndex& ix, TokensIn t) { ix.append(t.data(), t.shape(0)); }, "tokens"_a)
      .def("end_document", &OnlineIndex::end_document)
      .def("query", [](const OnlineIndex& ix, TokensIn ctx, const QueryParams& p) {
             nb::gil_scoped_release release;
             return ix.query(ctx.data(), ctx.shape(0), p);
           }, "context"_a, "params"_a)
      .def_prop_ro("num_tokens", &OnlineIndex::num_tokens)
      .def_prop_ro("num_documents", &OnlineIndex::num_documents)
      .def_prop_ro("memory_bytes", &OnlineIndex::memory_bytes);

  nb::class_<CorpusIndex>(m, "CorpusIndex")
      .def(nb::init<const std::string&, const std::string&, int64_t, int64_t, int>(), "tokens_path"_a,
           "sa_path"_a, "num_positions"_a, "num_suffixes"_a, "sorted_depth"_a)
      .def("query", [](const CorpusIndex& ix, TokensIn ctx, const QueryParams& p) {
             nb::gil_scoped_release release;
             return ix.query(ctx.data(), ctx.shape(0), p);
           }, "context"_a, "params"_a)
      .def("find_range", [](const CorpusIndex& ix, TokensIn pat) { return ix.find_range(pat.data(), pat.shape(0)); },
           "pattern"_a)
      .def("token", &CorpusIndex::token, "pos"_a)
      .def("suffix", &CorpusIndex::suffix, "rank"_a)
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

  m.def("build_tree", [](const std::vector<std::pair<const Candidates*, SourceConfig>>& sources, int max_nodes,
                         float min_score) {
          std::vector<SourceInput> inputs;
          for (const auto& [c, cfg] : sources) inputs.push_back(SourceInput{c, cfg.reliability, cfg.half_match, cfg.source_id});
          return tree_to_numpy(build_tree(inputs, max_nodes, min_score));
        }, "sources"_a, "max_nodes"_a, "min_score"_a);

  m.def("draft", &draft, "context"_a, "online"_a, "online_configs"_a, "corpora"_a, "corpus_configs"_a,
        "max_nodes"_a, "min_score"_a,
        "Query every index with the context tail and merge their tries into one draft tree "
        "(token_ids int32, parents int32, scores float32, sources uint8). Releases the GIL.");
}
