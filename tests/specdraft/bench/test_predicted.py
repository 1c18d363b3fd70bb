"""`specdraft bench predicted`'s inputs: edit requests from the refactor traces, FIM cuts from stdlib."""

from pathlib import Path

import pytest

from specdraft.bench.predicted import edit_requests, fim_cuts
from specdraft.bench.replay import DEFAULT_TRACES, load_traces

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = ROOT / ".." / "shared" / "models" / "qwen2.5-coder-1.5b"


def test_edit_requests_hold_the_instruction_and_the_file():
    traces_path = ROOT / DEFAULT_TRACES
    if not traces_path.is_file() or not TOKENIZER.is_dir():
        pytest.skip("the dev traces and the Qwen2.5-Coder tokenizer must be in ../shared")
    traces = load_traces(traces_path, ["refactor"], 3)["refactor"]
    requests = edit_requests(traces, str(TOKENIZER))
    assert len(requests) == 3
    for message, file in requests:
        assert message.startswith("Refactor") and f"```python\n{file}```" in message and "def " in file


def test_fim_cuts_are_prefix_middle_suffix_of_one_file():
    cuts = fim_cuts(5)
    assert len(cuts) >= 4 and cuts == fim_cuts(5)  # seeded: the same cuts every run
    for prefix, middle, suffix in cuts:
        assert middle.strip() and 1 <= middle.count("\n") <= 5 and prefix.endswith("\n")
