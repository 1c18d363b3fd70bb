"""specdraft bench generate: prompts recovered from the traces, one workload run end to end."""

from pathlib import Path

import pytest

from specdraft.bench.generate import WorkloadSpeed, prompt_ids, prompts_of, run_workload, table, write_chart
from specdraft.bench.replay import load_traces

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
TRACES, TOKENIZER = SHARED / "traces" / "dev.jsonl", SHARED / "models" / "qwen2.5-coder-1.5b"
pytestmark = pytest.mark.skipif(not TRACES.exists(), reason=f"no traces at {TRACES}")


def test_raw_prompts_are_the_decoded_text_and_chat_prompts_the_user_message():
    traces = load_traces(TRACES, ["code", "refactor"], limit=1)
    code, refactor = prompts_of(traces["code"], str(TOKENIZER))[0], prompts_of(traces["refactor"], str(TOKENIZER))[0]
    assert not code.chat and code.text.lstrip().startswith(("def ", "from ", "import "))
    assert refactor.chat and "<|im_" not in refactor.text and "type hints" in refactor.text


def test_a_workload_runs_with_drafting_equal_to_plain_decoding(smollm2):
    from retriever.drafting.drafter import Drafter
    from retriever.drafting.types import DrafterConfig
    from verifier.decoding.cost import CostModel
    from verifier.decoding.engine import Engine

    traces = load_traces(TRACES, ["refactor"], limit=2)["refactor"]
    prompts = prompts_of(traces, str(TOKENIZER))
    engine = Engine(smollm2, cost_model=CostModel.flat(), max_nodes=16)
    row = run_workload(engine, smollm2, Drafter(DrafterConfig()), "refactor", prompts, 6, hf=True)
    assert row.prompts == 2 and row.new_tokens == 12 and row.same_output
    assert 1 <= row.mat <= 6 and row.steps == round(row.new_tokens / row.mat)
    assert min(row.plain_tok_s, row.draft_tok_s, row.hf_tok_s, row.lookup_tok_s) > 0
    tail = smollm2.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert prompt_ids(prompts[0], smollm2.tokenizer)[-len(tail):] == tail


def test_table_shows_speedups_over_hf_greedy():
    row = WorkloadSpeed("code", 2, 100, 40, plain_tok_s=9.0, draft_tok_s=20.0, hf_tok_s=10.0, lookup_tok_s=15.0,
                        same_output=True)
    text = table([row], "head")
    assert "| code | 2 | 100 | 2.50 | 9.0 | 10.0 | 20.0 | 2.00x | 15.0 | 1.50x | yes |" in text


def test_differences_show_their_margins_and_the_chart_is_written(tmp_path):
    row = WorkloadSpeed("code", 20, 100, 40, plain_tok_s=9.0, draft_tok_s=20.0, hf_tok_s=10.0, lookup_tok_s=15.0,
                        same_output=False, margins=(0.125, 0.5), backend="llama.cpp")
    text = table([row], "head")
    assert "| NO: 2/20 differ (top-2 logit margins 0.12, 0.50) |" in text and "llama.cpp lookup 10 tok/s" in text
    write_chart([row, WorkloadSpeed("chat", 20, 90, 80, 9.0, 8.9, 10.0, 9.5, True, (), "llama.cpp")],
                str(tmp_path / "out" / "generate.png"))
    assert (tmp_path / "out" / "generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_timed_run_pays_its_own_prefill(smollm2):
    """A backend that keeps the prompt's cache (llama.cpp) forgets it before a timed run; the HF
    backend keeps nothing and is left as it is."""
    pytest.importorskip("llama_cpp")
    from specdraft.bench.generate import fresh_prefill
    from verifier.decoding.hf import HFBackend
    from verifier.decoding.llama_cpp import LlamaCppBackend
    from verifier.decoding.model import ModelSpec, resolve_gguf

    backend = LlamaCppBackend(resolve_gguf(ModelSpec("smollm2")), max_nodes=4, n_ctx=256, n_threads=2,
                              tokenizer=smollm2.tokenizer)
    ids = backend.tokenizer.encode("def fibonacci(n):")
    backend.start(ids)
    backend.start(ids)
    assert backend.reused == len(ids)
    fresh_prefill(backend)
    backend.start(ids)
    assert backend.reused == 0
    backend.close()
    fresh_prefill(HFBackend(smollm2))  # nothing to forget
