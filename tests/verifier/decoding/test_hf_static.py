"""verifier.decoding.hf_static on the CPU (float64): the static-cache path (padding to fixed
sizes, on-device compaction) equals plain greedy decoding (HF generate) token for token on
SmolLM2-135M with trees that force padding and rejected siblings; its committed cache equals a
plain prefill's; sampling through it stays lossless (chi-square against plain forwards); the
compaction against a slow reference on random caches and paths; the packed inputs and the
padded mask against `build_tree_inputs`; the timer sees padded sizes. CUDA graphs: only where
CUDA is available (skipped otherwise, never faked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retriever.drafting.drafter import Drafter
from retriever.drafting.types import DrafterConfig, DraftTree
from tests.trees import tree
from tests.verifier.decoding.test_accept import _chi2
from tests.verifier.decoding.test_engine import (  # noqa: F401 - fixtures shared with the dynamic-cache tests
    NEW,
    PROMPTS,
    GarbageDrafter,
    OracleDrafter,
    prompts,
    reference,
    run,
)
from verifier.decoding.accept import SamplingParams, accept_greedy, accept_sampling, warp
from verifier.decoding.cost import CostModel
from verifier.decoding.engine import Engine
from verifier.decoding.hf import HFBackend
from verifier.decoding.hf_static import SIZES, HFStaticBackend, pack_tree, size_of
from verifier.decoding.model import LoadedModel
from verifier.decoding.tree import build_tree_inputs
from verifier.drafting import LocalDraftSource

POSITIONS = 320  # static slots = POSITIONS + 65: small, so CPU attention over them stays cheap


@pytest.fixture(scope="module")
def static(smollm2):
    return HFStaticBackend(smollm2, max_positions=POSITIONS, graphs=False)


@pytest.fixture(scope="module")
def engine(static):
    return Engine(static, CostModel.flat(), max_nodes=16)


def test_plain_static_engine_equals_hf_generate(engine, prompts, reference):
    out, steps = run(engine, prompts[0], None, new=8)
    assert out == reference[0][:8] and all(len(s.tokens) == 1 for s in steps)


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_static_greedy_with_oracle_trees_among_random_branches_equals_plain(engine, smollm2, prompts, reference, i):
    drafter = OracleDrafter(reference[i], smollm2.vocab_size, seed=10 + i)
    out, steps = run(engine, prompts[i], drafter)
    assert out == reference[i]
    assert sum(s.accepted_nodes for s in steps) > 0
    assert any(s.draft_nodes + 1 not in SIZES for s in steps)  # padding was exercised


def test_static_greedy_with_retriever_and_garbage_drafts_equals_plain(engine, smollm2, prompts, reference):
    assert run(engine, prompts[0], LocalDraftSource(Drafter(DrafterConfig())))[0] == reference[0]
    assert run(engine, prompts[1], GarbageDrafter(smollm2.vocab_size, seed=7))[0] == reference[1]


def test_static_cache_after_a_step_equals_plain_prefill(engine, static, smollm2, prompts, reference):
    prompt, truth = prompts[1], reference[1]
    seq = engine.prefill(prompt)
    # random siblings before each true node: accepted nodes [1, 3, 5] must be moved into place
    draft = tree([7, truth[0], 9, truth[1], 11, truth[2], 13], [-1, -1, 1, 1, 3, 3, 5], np.linspace(1, 0.4, 7),
                 np.ones(7))
    logits, inputs = static.verify(seq.cache, seq.cache_len, seq.root, draft)
    assert logits.shape[0] == 8  # root + 7 of the 9 padded rows
    acceptance = accept_greedy(logits, inputs)
    assert acceptance.nodes.tolist() == [1, 3, 5] and acceptance.tokens.tolist() == truth[:4]
    engine.commit(seq, acceptance)
    got = [(layer.keys[:, :, :seq.cache_len].clone(), layer.values[:, :, :seq.cache_len].clone())
           for layer in static.cache.layers]
    plain = HFBackend(smollm2)
    cache = plain.start(prompt + truth[:3])
    for (k, v), layer in zip(got, cache.layers, strict=True):
        torch.testing.assert_close(k, layer.keys, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(v, layer.values, rtol=1e-9, atol=1e-9)


def test_seeded_sampling_through_the_static_cache_emits_the_same_tokens(engine, smollm2, prompts):
    sampling = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=11)
    plain, _ = run(engine, prompts[2], None, sampling, new=10)
    oracle, steps = run(engine, prompts[2], OracleDrafter(plain, smollm2.vocab_size, seed=5), sampling, new=10)
    assert oracle == plain and sum(s.accepted_nodes for s in steps) > 0


def test_sampling_through_padded_static_trees_is_lossless(static, smollm2, prompts):
    """Chi-square: tokens emitted from the static backend's padded tree logits follow the plain
    model's distribution (first token; second given the first is a root child)."""
    params = SamplingParams(temperature=1.0, top_k=6)
    prompt = prompts[1]
    with torch.inference_mode():
        first_logits = smollm2.model(torch.tensor([prompt])).logits[0, -1]
    children = torch.topk(first_logits, 3).indices.tolist()
    draft = tree(children + [5, 6], [-1, -1, -1, 0, 1], np.linspace(1, 0.5, 5), np.ones(5))  # 6 rows: size 9
    handle = static.start(prompt[:-1])
    logits, _ = static.verify(handle, len(prompt) - 1, prompt[-1], draft)
    gen = torch.Generator().manual_seed(99)
    first, second = np.zeros(smollm2.vocab_size), {t: np.zeros(smollm2.vocab_size) for t in children}
    for _ in range(3000):
        out = accept_sampling(logits, draft, params, torch.rand(4, generator=gen, dtype=torch.float64)).tokens.tolist()
        first[out[0]] += 1
        if out[0] in second and len(out) > 1:
            second[out[0]][out[1]] += 1
    stat, df = _chi2(first, warp(first_logits, params))
    for t, counts in second.items():
        with torch.inference_mode():
            want = smollm2.model(torch.tensor([prompt + [t]])).logits[0, -1]
        s, d = _chi2(counts, warp(want, params))
        stat, df = stat + s, df + d
    assert float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2))) > 1e-3


def random_draft(rng: np.random.Generator, n: int, vocab: int) -> DraftTree:
    parents = [int(rng.integers(-1, i)) if i else -1 for i in range(n)]
    return tree(rng.integers(0, vocab, n), parents, np.linspace(1, 0.1, n), np.ones(n))


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama in float64 (fast enough for many random cases)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    return LoadedModel(model, None, (), 97, 256, torch.float64, torch.device("cpu"), "")


@pytest.mark.parametrize("seed", range(6))
def test_padded_inputs_equal_build_tree_inputs_and_rows_equal_the_dynamic_backend(tiny, seed):
    rng = np.random.default_rng(seed)
    static, dynamic = HFStaticBackend(tiny, max_positions=120), HFBackend(tiny)
    prompt = rng.integers(0, 97, int(rng.integers(1, 40))).tolist()
    draft = random_draft(rng, int(rng.integers(0, 70)), 97)  # up to past the largest size: unpadded then
    cache_len = len(prompt) - 1
    got, inputs = static.verify(static.start(prompt[:-1]), cache_len, prompt[-1], draft)
    want, ref = dynamic.verify(dynamic.start(prompt[:-1]), cache_len, prompt[-1], draft)
    for name in ("input_ids", "position_ids", "attention_mask", "depth", "ancestor", "parent_rows"):
        assert torch.equal(getattr(inputs, name), getattr(ref, name)), name
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_pack_tree_and_sizes():
    assert [size_of(r) for r in (1, 2, 9, 10, 33, 65, 66)] == [1, 9, 9, 17, 33, 65, 66]
    packed = pack_tree(4, tree([5, 6], [-1, 0], [1, 1], [1, 1]), cache_len=5, size=9)
    assert packed.shape == (3 * 9 + 81,) and packed[-1] == 5
    assert packed[:9].tolist() == [4, 5, 6] + [0] * 6 and packed[9:18].tolist() == [5, 6, 7] + [5] * 6
    assert packed[18:26].tolist() == [0, 1] + [0] * 6
    anc = packed[26:26 + 81].reshape(9, 9)
    assert anc[2].tolist() == [1, 1, 1] + [0] * 6 and anc[5].tolist() == [0] * 5 + [1] + [0] * 3
    with pytest.raises(ValueError, match="tree must fit the padded size"):
        pack_tree(4, tree([5, 6], [-1, 0], [1, 1], [1, 1]), 5, size=2)


def slow_commit(keys: torch.Tensor, keep: int, accepted: list[int]) -> torch.Tensor:
    """Reference: slots [0, keep) as they are, then the accepted slots in path order (one by one)."""
    out = keys.clone()
    for i, node in enumerate(accepted):
        out[:, :, keep + i] = keys[:, :, keep + node]
    return out


@pytest.mark.parametrize("seed", range(8))
def test_compaction_matches_slow_reference_on_random_caches(tiny, seed):
    rng = np.random.default_rng(seed)
    static = HFStaticBackend(tiny, max_positions=100)
    handle = static.start([1, 2, 3])
    for layer in static.cache.layers:
        layer.keys.copy_(torch.randn(layer.keys.shape, dtype=layer.keys.dtype))
        layer.values.copy_(torch.randn(layer.values.shape, dtype=layer.values.dtype))
    n = int(rng.integers(1, 80))  # paths past the captured width (64) too
    draft = random_draft(rng, n, 97)
    leaf = int(rng.integers(0, n))
    path, i = [], leaf
    while i >= 0:
        path.insert(0, i)
        i = int(draft.parents[i])
    cache_len = int(rng.integers(0, 100 - len(path)))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in static.cache.layers]
    static.commit(handle, cache_len, path)
    keep = cache_len + 1
    for (k, v), layer in zip(before, static.cache.layers):
        want_k, want_v = slow_commit(k, keep, path), slow_commit(v, keep, path)
        assert torch.equal(layer.keys[:, :, :keep + len(path)], want_k[:, :, :keep + len(path)])
        assert torch.equal(layer.values[:, :, :keep + len(path)], want_v[:, :, :keep + len(path)])


def test_stale_handles_and_bad_lengths_are_refused(tiny):
    static = HFStaticBackend(tiny, max_positions=100)
    old = static.start([1, 2])
    static.start([3])
    with pytest.raises(RuntimeError, match="current generation"):
        static.verify(old, 2, 4, DraftTree.empty())
    with pytest.raises(ValueError, match="context must be at most 100 tokens"):
        static.start(list(range(101)))
    with pytest.raises(ValueError, match="max_positions must be >= 2"):
        HFStaticBackend(tiny, max_positions=1)
    assert static.max_positions == 100 and static.slots == 165 and not static.graphs  # no CUDA here: no graphs


def test_timer_times_padded_sizes(tiny):
    static = HFStaticBackend(tiny, max_positions=120)
    cm = CostModel.measure(static, max_tokens=65, cache_len=16, reps=1, stop_ratio=1e9)  # no early stop
    # timed at the padded sizes 1, 9, 17, 33, 65 only; a staircase between them
    assert cm.tokens == (1, 2, 9, 10, 17, 18, 33, 34, 65) and all(c > 0 for c in cm.cost_ns)
    assert cm.cost_ns[1] == cm.cost_ns[2] and cm.cost_ns[3] == cm.cost_ns[4] and cm.cost_ns[7] == cm.cost_ns[8]
    assert static.precision == "float64 cpu static eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA (skipped on CPU, never faked)")
def test_captured_graphs_equal_the_eager_static_path(tiny):
    import copy
    from dataclasses import replace

    cuda = replace(tiny, model=copy.deepcopy(tiny.model).to("cuda"), device=torch.device("cuda"))
    graphs, eager = HFStaticBackend(cuda, max_positions=120), HFStaticBackend(cuda, max_positions=120, graphs=False)
    assert graphs.graphs and all(step.graph is not None for step in graphs._steps.values())
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 97, 20).tolist()
    for n in (0, 5, 12, 30, 64):
        draft = random_draft(rng, n, 97)
        got, _ = graphs.verify(graphs.start(prompt[:-1]), 19, prompt[-1], draft)
        want, _ = eager.verify(eager.start(prompt[:-1]), 19, prompt[-1], draft)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    engine_g, engine_e = Engine(graphs, CostModel.flat()), Engine(eager, CostModel.flat())
    drafter = OracleDrafter(run(engine_e, prompt, None, new=24)[0], 97, seed=1)
    assert run(engine_g, prompt, drafter, new=24)[0] == drafter.truth
