"""`specdraft bench predicted`'s inputs: edit requests from the refactor traces, FIM cuts from stdlib;
its edit comparison (each request's variants from the same untimed policy state) on SmolLM2."""

from pathlib import Path

import pytest

from retriever.drafting.drafter import Drafter
from retriever.drafting.types import DrafterConfig
import numpy as np

from retriever.drafting.types import DraftTree
from specdraft.bench.predicted import (VARIANTS, EditResults, FimScore, Tally, edit_requests, fim_cuts, fim_line,
                                        replay_drafts, run_edits, score_fim, table)
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
    results = run_edits(engine, smollm2, Drafter(DrafterConfig()), requests, 16, replay_drafter=Drafter(DrafterConfig()))
    first, second = engine.starts[:3], engine.starts[3:]
    assert len(engine.starts) == 6 and first == [first[0]] * 3 and second == [second[0]] * 3
    assert first[0] != second[0]  # the first request's runs did teach the policy (kept for the next request)
    tallies, drafts = results.engine, results.drafts
    assert results.same and tallies["none"].mats == tallies["right"].mats == tallies["wrong"].mats
    assert drafts["none"].tokens == tallies["none"].tokens == 32 and drafts["none"].mats == drafts["wrong"].mats
    assert min(drafts["none"].mats) > 1.0  # "repeat this code": the whole-tree replay accepts drafts


class ListSource:
    """A draft source proposing fixed trees in turn, noting what the replay reports."""

    def __init__(self, trees: list[DraftTree | None]) -> None:
        self.trees, self.calls, self.ended = list(trees), [], None

    def start(self, prompt_ids):
        self.prompt = list(prompt_ids)

    def draft(self, new_tokens, max_nodes, verified_nodes=0):
        self.calls.append((list(new_tokens), verified_nodes))
        return self.trees.pop(0)

    def end(self, verified_nodes=0):
        self.ended = verified_nodes


def test_replay_accepts_the_longest_matching_path_and_the_bonus_token():
    # output 5 6 7 8 9; tree 1: 5 -> 6 -> 0 and 5 -> 7 (accepts 5 6, bonus 7); no tree (bonus 8); tree 3: 9
    first = DraftTree(np.array([5, 6, 0, 7], np.int32), np.array([-1, 0, 1, 0], np.int32), np.ones(4, np.float32),
                      np.ones(4, np.uint8))
    source = ListSource([first, None, DraftTree.chain([9])])
    assert replay_drafts(source, [1, 2], [5, 6, 7, 8, 9], 8) == (5, 3)
    assert source.calls == [([], 0), ([5, 6, 7], 4), ([8], 0)] and source.ended == 1 and source.prompt == [1, 2]


def test_the_table_judges_the_drafts_mat_and_prints_the_policy_s_beside_it():
    def tallies(mats):
        out = {v: Tally() for v in VARIANTS}
        for v, per in zip(VARIANTS, mats):
            for tokens, steps in per:
                out[v].add(tokens, steps, 1.0, 0.5)
        return out

    results = EditResults(tallies([[(10, 5), (10, 2)], [(10, 5), (10, 1)], [(10, 5), (10, 2)]]),
                          tallies([[(10, 4), (10, 2)], [(10, 5), (10, 1)], [(10, 4), (10, 2)]]), True)
    text = table(results, None, "m", 0, 0)
    assert text.endswith("FIM: none asked (--fim 0)") and table(results, None, "m", 5, 9).endswith(
        "FIM: skipped, model m has no fill-in-the-middle tokens")
    assert "| right | 2 | 20 | 3.33 | 3.33 | 10.0 |" in text
    assert "right/none drafts' MAT: worst request 0.800 (target >= 0.98), mean 1.600 (target > 1)" in text
    assert "wrong/none tokens/s 1.000" in text and "same output in all three: yes" in text
    assert "MAT under the step policy (steps of one request: a step moves it by 1/steps): worst request 1.000, " \
           "mean 1.714" in text
