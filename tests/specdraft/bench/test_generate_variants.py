"""specdraft bench generate --variants: the five decoders over one workload on the CPU (float64
SmolLM2: every output equals HF eager's; the graphs row says it ran without graphs), the table's
speedups, and when the variants run by default."""

from pathlib import Path

import pytest

from specdraft.bench.generate_variants import VARIANTS, VariantSpeed, Variants, run_workload, table, wants_variants

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
TRACES, TOKENIZER = SHARED / "traces" / "dev.jsonl", SHARED / "models" / "qwen2.5-coder-1.5b"


@pytest.mark.skipif(not TRACES.exists(), reason=f"no traces at {TRACES}")
def test_five_decoders_over_a_workload_agree_on_the_cpu(smollm2):
    from retriever.drafting.drafter import Drafter
    from retriever.drafting.types import DrafterConfig
    from specdraft.bench.generate import prompts_of
    from specdraft.bench.replay import load_traces
    from verifier.decoding.cost import CostModel

    prompts = prompts_of(load_traces(TRACES, ["chat"], limit=1)["chat"], str(TOKENIZER))
    variants = Variants(smollm2, max_nodes=16, static_positions=1024, warm_tokens=8, warm_new=2,
                        cost_model=CostModel.flat())
    drafters = {v: Drafter(DrafterConfig()) for v in ("specdraft-eager", "specdraft-graphs")}
    rows = run_workload(variants, drafters, "chat", prompts, 4)
    assert [r.variant for r in rows] == list(VARIANTS)
    assert all(r.same_output and r.new_tokens == 4 and r.tok_s > 0 for r in rows)
    engine_rows = [r for r in rows if r.variant.startswith("specdraft")]
    assert all(1 <= r.mat <= 4 and r.draft_ns > 0 and 0 < r.draft_share < 1 for r in engine_rows)
    assert "no CUDA graphs" in rows[-1].note and "not compiled" in rows[1].note


def test_table_speedups_over_the_compiled_baseline_and_eager():
    rows = [VariantSpeed("code", "hf-eager", 1, 100, 10.0, 0, 0, 0, True),
            VariantSpeed("code", "hf-static-compile", 1, 100, 5.0, 0, 0, 0, True),
            VariantSpeed("code", "specdraft-graphs", 1, 100, 1.0, 25, 5_000_000, 45_000_000, False, "n")]
    text = table(rows, "head")
    assert "| code | hf-eager | 100 | 10.0 | - | - | - | 0.50x | 1.00x | yes |  |" in text
    assert "| code | specdraft-graphs | 100 | 100.0 | 4.00 | 0.20 | 10.0% | 5.00x | 10.00x | NO | n |" in text


def test_variants_are_the_default_on_cuda_only():
    from argparse import Namespace

    assert wants_variants(Namespace(variants=None, device="cuda:0"))
    assert not wants_variants(Namespace(variants=None, device="cpu"))
    assert wants_variants(Namespace(variants=True, device="cpu"))
    assert not wants_variants(Namespace(variants=False, device="cuda"))
