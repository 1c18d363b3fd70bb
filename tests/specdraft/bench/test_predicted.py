"""`specdraft bench predicted`'s inputs: edit requests from the refactor traces, FIM cuts from stdlib;
its edit comparison (each request's variants from the same untimed policy state) on SmolLM2."""

from pathlib import Path

import pytest

from retriever.drafting.drafter import Drafter
from retriever.drafting.types import DrafterConfig
from specdraft.bench.predicted import FimScore, Tally, edit_requests, fim_cuts, fim_line, run_edits, score_fim
from specdraft.bench.replay import DEFAULT_TRACES, load_traces
from verifier.decoding.cost import CostModel
from verifier.decoding.engine import Engine

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
    assert len(cuts) == 5 and cuts == fim_cuts(5)  # seeded: the same cuts every run
    assert len(fim_cuts(20)) == 20  # blank middles are replaced by cuts of other files
    for prefix, middle, suffix in cuts:
        assert middle.strip() and 1 <= middle.count("\n") <= 5 and prefix.endswith("\n")


def test_fim_scores_name_what_matches():
    middle = "    a = 1\n    b = 2\n"
    assert score_fim(middle, middle, True) == FimScore(True, True, True, True, True)
    trailing = score_fim("    a = 1  \n    b = 2\n\n", middle, True)  # trailing spaces, a blank line after
    assert (trailing.exact, trailing.exact_trimmed, trailing.lines, trailing.first_line) == (False, True, True, True)
    more = score_fim(middle + "    c = 3\n", middle, False)  # the middle, then into the suffix, to the limit
    assert (more.exact, more.exact_trimmed, more.lines, more.first_line, more.ended) == (False, False, True, True,
                                                                                          False)
    first = score_fim("    a = 1\n    b = 3\n", middle, True)
    assert (first.exact_trimmed, first.lines, first.first_line) == (False, False, True)
    indent = score_fim("a = 1\nb = 2\n", middle, True)  # leading whitespace counts
    assert not (indent.exact_trimmed or indent.lines or indent.first_line)
    assert score_fim("", middle, True) == FimScore(False, False, False, False, True)
    assert score_fim("", "\n", True).exact_trimmed and not score_fim("", "\n", True).lines  # nothing to match


def test_fim_line_reports_each_measure_out_of_the_completions():
    t = Tally()
    t.add(10, 5, 4.0, 3.0)  # 10 tokens in 5 steps, 4 s, the first step 3 s
    t.add(6, 6, 2.0, 1.0)
    scores = [score_fim("x\n", "x\n", True), score_fim("x\ny\n", "x\n", False)]
    line = fim_line(t, scores, 3, 64)
    assert line.startswith("FIM: 2 completions (of 3 asked), at most 64 new tokens: MAT 1.45, 2.7 tokens/s")
    assert "first steps (the prompt's forward + one step) 4.0 s of 6.0 s, 7.0 tokens/s after them" in line
    assert "ended by the model 1/2" in line and "exact match 1/2" in line
    assert "exact with trailing whitespace trimmed 1/2, the middle's lines then more 2/2, first line 2/2" in line


class RecordingEngine(Engine):
    """A real engine that notes its policy's state as each generation starts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.starts: list[tuple] = []

    def generate(self, *args, **kwargs):
        p = self.policy
        self.starts.append((p.cost.cost_ns, p.cost.scale, p.draft_ns, p.misses, p.calibration.verified.tolist(),
                            p.calibration.accepted.tolist()))
        return super().generate(*args, **kwargs)


def test_each_request_s_variants_start_from_the_same_policy_state(smollm2):
    """Every variant of a request starts from the state the request found (the calibration learned by
    one variant would steer the next one's trees); predictions all empty, so the variants draft alike
    and, untimed, their MATs are equal request by request."""
    engine = RecordingEngine(smollm2, CostModel((1, 2, 17), (10e6, 11e6, 30e6)), max_nodes=16, timed=False)
    code = ["def add(a, b):\n    return a + b\n", "def scale(xs, k):\n    return [x * k for x in xs]\n"]
    requests = [(f"Repeat this code exactly.\n\n```python\n{c}```", "") for c in code]
    tallies, same = run_edits(engine, smollm2, Drafter(DrafterConfig()), requests, 16)
    first, second = engine.starts[:3], engine.starts[3:]
    assert len(engine.starts) == 6 and first == [first[0]] * 3 and second == [second[0]] * 3
    assert first[0] != second[0]  # the first request's runs did teach the policy (kept for the next request)
    assert same and tallies["none"].mats == tallies["right"].mats == tallies["wrong"].mats
