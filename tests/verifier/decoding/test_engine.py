"""The engine on the real model (SmolLM2-135M, float64, CPU): speculative greedy output equals
plain greedy output (HF `generate`) token for token, with the in-process retriever drafter, with
oracle trees hidden among random branches, and with garbage drafts; the KV cache after a step
equals the cache of plain decoding over the accepted tokens; seeded sampling with drafting emits
exactly the tokens of seeded sampling without; stop tokens, max tokens, a failing drafter; an
untimed engine (steps priced by the cost curve) never refines the curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retriever.drafting.drafter import Drafter
from retriever.drafting.types import DrafterConfig, DraftTree
from tests.trees import tree
from verifier.decoding.accept import SamplingParams, accept_greedy
from verifier.decoding.cache import kv_tensors
from verifier.decoding.cost import CostModel
from verifier.decoding.engine import DraftSource, Engine
from verifier.decoding.hf import HFBackend
from verifier.decoding.stats import StepResult
from verifier.drafting import LocalDraftSource

NEW = 16
PROMPTS = [
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 1, 2, 3, 4,",
    "import os\n\n\ndef list_files(path):\n    \"\"\"Return the names of the files under path.\"\"\"\n",
    None,  # a chat prompt, built from the tokenizer's chat template
]


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, CostModel.flat(), max_nodes=16)


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = smollm2.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a Python function reversing a string."}],
                                   add_generation_prompt=True, tokenize=False)
    return [tok.encode(p if p is not None else chat) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(smollm2, prompts):
    """Plain greedy continuations by HF generate (stops after EOS, like the engine)."""
    out = []
    for ids in prompts:
        with torch.inference_mode():
            gen = smollm2.model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                                         eos_token_id=list(smollm2.eos_token_ids), pad_token_id=2)
        out.append(gen[0, len(ids):].tolist())
    return out


def run(engine: Engine, prompt: list[int], drafter: DraftSource | None, sampling=SamplingParams(),
        new=NEW, stops=None) -> tuple[list[int], list[StepResult]]:
    steps = list(engine.generate(prompt, new, sampling, drafter, stops))
    return [t for s in steps for t in s.tokens], steps


class OracleDrafter:
    """Knows the right continuation; hides it among random branches, sometimes corrupted.

    The true child comes after its random siblings in node order, so accepted paths are not a
    prefix of the draft. Also checks the DraftSource protocol: new_tokens = what was emitted.
    """

    def __init__(self, truth: list[int], vocab: int, seed: int) -> None:
        self.truth, self.vocab, self.rng = truth, vocab, np.random.default_rng(seed)
        self.reported: list[int] = []
        self.calls = self.ended = 0

    def start(self, prompt_ids: list[int]) -> None:
        self.prompt, self.reported, self.calls, self.ended = prompt_ids, [], 0, 0

    def draft(self, new_tokens: list[int], max_nodes: int, verified_nodes: int = 0) -> DraftTree | None:
        assert self.calls > 0 or new_tokens == []
        self.calls += 1
        self.reported += new_tokens
        assert self.reported == self.truth[:len(self.reported)]
        tokens, parents = [], []
        parent, pos = -1, len(self.reported)
        for _ in range(int(self.rng.integers(0, 6))):
            for _ in range(int(self.rng.integers(0, 3))):  # random siblings first, each with a random child
                tokens.append(int(self.rng.integers(0, self.vocab)))
                parents.append(parent)
                if self.rng.random() < 0.5:
                    tokens.append(int(self.rng.integers(0, self.vocab)))
                    parents.append(len(tokens) - 2)
            right = self.truth[pos] if pos < len(self.truth) else 0
            tokens.append(right if self.rng.random() < 0.85 else int(self.rng.integers(0, self.vocab)))
            parents.append(parent)
            parent, pos = len(tokens) - 1, pos + 1
        tokens, parents = tokens[:max_nodes], parents[:max_nodes]
        if not tokens:
            return None
        n = len(tokens)
        return tree(tokens, parents, np.linspace(1, 0.5, n), np.full(n, 1 + self.calls % 3))

    def end(self, verified_nodes: int = 0) -> None:
        self.ended += 1


class GarbageDrafter:
    """Random trees over the whole vocabulary, some with invalid token ids; raises now and then."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab, self.rng = vocab, np.random.default_rng(seed)

    def start(self, prompt_ids: list[int]) -> None:
        pass

    def draft(self, new_tokens: list[int], max_nodes: int, verified_nodes: int = 0) -> DraftTree | None:
        roll = self.rng.random()
        if roll < 0.1:
            raise RuntimeError("retriever down")
        if roll < 0.2:
            return None
        n = int(self.rng.integers(1, 17))
        tokens = self.rng.integers(-3, self.vocab + 3, n)
        parents = [int(self.rng.integers(-1, i)) if i else -1 for i in range(n)]
        return tree(tokens, parents, np.sort(self.rng.random(n))[::-1], np.full(n, 3))

    def end(self, verified_nodes: int = 0) -> None:
        pass


def test_plain_engine_equals_hf_generate(engine, prompts, reference):
    out, steps = run(engine, prompts[0], None, new=8)
    assert out == reference[0][:8]
    assert all(s.draft_nodes == 0 and s.accepted_nodes == 0 and len(s.tokens) == 1 for s in steps)


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_greedy_with_retriever_drafts_equals_plain(engine, prompts, reference, i):
    out, steps = run(engine, prompts[i], LocalDraftSource(Drafter(DrafterConfig())))
    assert out == reference[i]
    if i == 0:  # a repetitive prompt: context drafts get accepted
        assert sum(s.accepted_nodes for s in steps) >= NEW // 2 and len(steps) <= NEW // 4
        assert all(src == 1 for s in steps for src in s.accepted_sources)  # Source.CONTEXT


@pytest.mark.parametrize("timed", [True, False])
def test_an_untimed_engine_never_refines_its_curve_and_emits_the_same(smollm2, prompts, reference, timed):
    curve = CostModel((1, 2, 17), (10e6, 12e6, 30e6))  # refinable (weight 0.1), unlike the flat one
    engine = Engine(smollm2, curve, max_nodes=16, timed=timed)
    assert engine.policy.timed is timed
    out, steps = run(engine, prompts[0], LocalDraftSource(Drafter(DrafterConfig())))
    assert out == reference[0] and any(s.accepted_nodes for s in steps)
    assert (curve.observed, curve.scale == 1.0) == ((len(steps), False) if timed else (0, True))
    assert timed or (curve.tokens, curve.cost_ns) == ((1, 2, 17), (10e6, 12e6, 30e6))  # untimed: as built
    assert (engine.policy.draft_ns > 0) is timed  # the round trip is measured only when timed


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_greedy_with_oracle_trees_among_random_branches_equals_plain(engine, smollm2, prompts, reference, i):
    drafter = OracleDrafter(reference[i], smollm2.vocab_size, seed=i)
    out, steps = run(engine, prompts[i], drafter)
    assert out == reference[i]
    # told of the output in order (the steps after the last draft call are the caller's to report)
    assert drafter.ended == 1 and drafter.reported == out[:len(drafter.reported)]
    assert sum(s.accepted_nodes for s in steps) > 0
    for s in steps:
        assert len(s.accepted_sources) == s.accepted_nodes <= s.draft_nodes


@pytest.mark.parametrize("i", [1])
def test_greedy_with_garbage_drafts_equals_plain(engine, smollm2, prompts, reference, i):
    out, _ = run(engine, prompts[i], GarbageDrafter(smollm2.vocab_size, seed=i))
    assert out == reference[i]


def test_cache_after_a_step_equals_plain_decoding_cache(engine, smollm2, prompts, reference):
    prompt, truth = prompts[1], reference[1]
    seq = engine.prefill(prompt)
    # random siblings before each true node: the accepted nodes are [1, 3, 5], not a draft prefix
    draft = tree([7, truth[0], 9, truth[1], 11, truth[2], 13], [-1, -1, 1, 1, 3, 3, 5], np.linspace(1, 0.4, 7),
                  np.ones(7))
    logits, inputs = engine.backend.verify(seq.cache, seq.cache_len, seq.root, draft)
    acceptance = accept_greedy(logits, inputs)
    assert acceptance.nodes.tolist() == [1, 3, 5] and acceptance.tokens.tolist() == truth[:4]
    engine.commit(seq, acceptance)
    plain = engine.prefill(prompt + truth[:4])  # caches prompt + the 3 accepted tokens
    assert seq.cache_len == plain.cache_len == len(prompt) + 3 and seq.root == plain.root == truth[3]
    for (k, v), (k_ref, v_ref) in zip(kv_tensors(seq.cache), kv_tensors(plain.cache), strict=True):
        assert k.shape == k_ref.shape
        torch.testing.assert_close(k, k_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(v, v_ref, rtol=1e-9, atol=1e-9)
    # and the step after the commit continues as plain decoding does
    out, _ = run(engine, prompt + truth[:4], None, new=3)
    assert out == truth[4:7]


def test_seeded_sampling_with_drafts_emits_the_same_tokens(engine, smollm2, prompts):
    sampling = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=11)
    plain, _ = run(engine, prompts[2], None, sampling)
    other = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=12)
    assert plain[:8] != run(engine, prompts[2], None, other, new=8)[0]
    oracle, steps = run(engine, prompts[2], OracleDrafter(plain, smollm2.vocab_size, seed=5), sampling)
    assert oracle == plain and sum(s.accepted_nodes for s in steps) > 0
    local, _ = run(engine, prompts[2], LocalDraftSource(Drafter(DrafterConfig())), sampling)
    assert local == plain
    typical, _ = run(engine, prompts[2], LocalDraftSource(Drafter(DrafterConfig())),
                     SamplingParams(temperature=0.8, seed=11, typical=True), new=8)
    assert len(typical) == 8  # lossy: only that it runs


def test_stop_tokens_and_max_new_tokens(engine, smollm2, prompts, reference):
    truth = reference[1]
    stop = truth[5]
    want = truth[:truth.index(stop) + 1]
    out, steps = run(engine, prompts[1], OracleDrafter(truth, smollm2.vocab_size, seed=3), stops=[stop])
    assert out == want and steps[-1].tokens[-1] == stop
    out, _ = run(engine, prompts[1], OracleDrafter(truth, smollm2.vocab_size, seed=4), new=7)
    assert out == truth[:7]
    assert run(engine, prompts[1], None, new=0)[0] == []
    with pytest.raises(ValueError, match="prompt_ids must be in"):
        run(engine, [smollm2.vocab_size], None)


def test_measured_cost_model(smollm2):
    cm = CostModel.measure(HFBackend(smollm2), max_tokens=8, cache_len=32, reps=1)
    assert cm.tokens[0] == 1 and list(cm.tokens) == sorted(cm.tokens) and all(c > 0 for c in cm.cost_ns)
    assert list(cm.cost_ns) == sorted(cm.cost_ns)  # more tokens never cost less
    assert cm.best_prefix(np.zeros(7, np.float32)) == 0  # nothing is accepted: verify nothing
    for p in (0.2, 0.5, 0.9, 1.0):
        scores = np.full(7, p, np.float32)
        rates = [(1 + k * p) / float(cm.at(1 + k)) for k in range(8)]
        assert cm.best_prefix(scores) == rates.index(max(rates))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_forward_rows_equal_plain_forwards_of_their_paths(arch, attn):
    """The 4-D tree mask is honoured: each row's logits equal a plain causal forward over
    prompt + the node's path (tiny random Llama / Qwen2 models, float64)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from verifier.decoding.model import LoadedModel

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    config = LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    loaded = LoadedModel(model, None, (), 97, 128, torch.float64, torch.device("cpu"), "")
    engine = Engine(loaded, CostModel.flat())
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 97, 11).tolist()
    n = 14
    draft = tree(rng.integers(0, 97, n), [int(rng.integers(-1, i)) if i else -1 for i in range(n)],
                  np.linspace(1, 0.1, n), np.zeros(n))
    seq = engine.prefill(prompt)
    logits, _ = engine.backend.verify(seq.cache, seq.cache_len, seq.root, draft)
    for row in range(n + 1):
        path, i = [], row - 1
        while i >= 0:
            path.insert(0, int(draft.token_ids[i]))
            i = int(draft.parents[i])
        with torch.inference_mode():
            want = model(torch.tensor([prompt + path])).logits[0, -1]
        tol = 1e-9 if attn == "sdpa" else 1e-6  # eager takes its softmax in float32 even for float64 models
        torch.testing.assert_close(logits[row], want, rtol=tol, atol=tol)


def test_loaded_model_and_clear_load_errors(smollm2, tmp_path):
    from verifier.decoding.model import ModelLoadError, ModelSpec, load_model

    assert (smollm2.vocab_size, smollm2.max_positions, smollm2.eos_token_ids) == (49152, 8192, (2,))
    assert smollm2.dtype == torch.float64 and smollm2.model.dtype == torch.float64 and not smollm2.model.training
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelSpec(dtype="int8")
    with pytest.raises(ValueError, match="device must be"):
        ModelSpec(device="tpu")
    with pytest.raises(ModelLoadError, match="GGUF model file must exist"):
        load_model(ModelSpec(str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match="must contain config.json"):
        load_model(ModelSpec(str(tmp_path)))
    with pytest.raises(ModelLoadError, match="must hold a transformers causal LM"):
        load_model(ModelSpec("no-such-org/no-such-model-xyz"))
