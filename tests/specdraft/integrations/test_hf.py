"""HF transformers attachment: `model.generate(custom_generate=SpecdraftGenerate(...))` against a real
retriever on a free port equals plain greedy `generate` in float64, and refuses what it cannot do."""

import pytest
import torch

from specdraft.integrations.hf import SpecdraftGenerate
from verifier.decoding.cost import CostModel

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("


def _ids(smollm2, text=PROMPT):
    return smollm2.tokenizer(text, return_tensors="pt").input_ids  # [1, p] int64


def test_greedy_output_equals_plain_generate_and_drafts_are_accepted(smollm2, retriever_target):
    ids = _ids(smollm2)
    plain = smollm2.model.generate(ids, max_new_tokens=24, do_sample=False)
    attach = SpecdraftGenerate(retriever_target, tenant="hf", max_nodes=16, cost_model=CostModel.flat())
    try:
        ours = smollm2.model.generate(ids, max_new_tokens=24, do_sample=False, custom_generate=attach)
    finally:
        attach.close()
    assert torch.equal(ours, plain)
    run = attach.last_run
    assert run.new_tokens == plain.shape[1] - ids.shape[1] and run.accepted_draft_tokens > 0
    assert run.steps < run.new_tokens  # the repeated function was drafted from the prompt


def test_a_retriever_that_is_down_costs_speed_only(smollm2):
    ids = _ids(smollm2, "The capital of France is")
    plain = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False)
    attach = SpecdraftGenerate("127.0.0.1:1", cost_model=CostModel.flat(), deadline_s=0.01)
    try:
        ours = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=attach)
    finally:
        attach.close()
    assert torch.equal(ours, plain) and attach.last_run.accepted_draft_tokens == 0


def test_unsupported_requests_are_refused_with_clear_messages(smollm2, retriever_target):
    attach = SpecdraftGenerate(retriever_target, cost_model=CostModel.flat())
    ids = _ids(smollm2, "hello")
    try:
        with pytest.raises(ValueError, match=r"input_ids must be \[1, prompt_len\], got \[2, "):
            smollm2.model.generate(ids.repeat(2, 1), max_new_tokens=2, do_sample=False, custom_generate=attach)
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        with pytest.raises(ValueError, match="attention_mask must be all ones"):
            smollm2.model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                   custom_generate=attach)
        with pytest.raises(ValueError, match=r"logits processors must be among .*RepetitionPenalty"):
            smollm2.model.generate(ids, max_new_tokens=2, do_sample=False, repetition_penalty=1.3,
                                   custom_generate=attach)
    finally:
        attach.close()


def test_sampling_settings_map_to_lossless_sampling(smollm2, retriever_target):
    from transformers import GenerationConfig

    from specdraft.integrations.hf import _sampling

    assert _sampling(GenerationConfig(do_sample=False)).greedy
    s = _sampling(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=20))
    assert (s.temperature, s.top_p, s.top_k, s.typical) == (pytest.approx(0.7), pytest.approx(0.9), 20, False)
    attach = SpecdraftGenerate(retriever_target, cost_model=CostModel.flat())
    ids = _ids(smollm2)
    try:
        out = smollm2.model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20,
                                     custom_generate=attach)
    finally:
        attach.close()
    assert torch.equal(out[:, :ids.shape[1]], ids) and ids.shape[1] < out.shape[1] <= ids.shape[1] + 6


def test_curve_kept_says_whether_the_first_call_measures_the_cost_curve(smollm2, tmp_path):
    given = SpecdraftGenerate("127.0.0.1:1", cost_model=CostModel.flat())
    kept = SpecdraftGenerate("127.0.0.1:1", cost_dir=str(tmp_path / "costs"), deadline_s=0.01)
    try:
        assert given.curve_kept(smollm2.model) and not kept.curve_kept(smollm2.model)
        smollm2.model.generate(_ids(smollm2), max_new_tokens=2, do_sample=False, custom_generate=kept)
        assert kept.curve_kept(smollm2.model)  # the first call measured it and kept it for the next process
    finally:
        given.close()
        kept.close()
