"""The demo's rows without a model: decode and end-to-end rates, speedups over plain and over the best
anchor, the same-output flags, the table, the JSON and the chart; the workloads and `--rows`."""

import json

import pytest

from specdraft.demo_report import DemoRow, chart, table, write_json
from specdraft.demo_runs import Run
from specdraft.demo_workloads import DEMO_PROMPTS, select
from verifier.decoding.divergence import NEAR_TIE_LOGITS, Divergence

P = DEMO_PROMPTS[0]


def _row(draft_ids=tuple(range(41)), lookup16_ids=tuple(range(41))) -> DemoRow:
    return DemoRow(P, 600, (
        Run("plain", tuple(range(41)), 5.0, 7.5, 1, 41),  # 40 tokens in 2.5 s after the first: 16 tok/s
        Run("llama.cpp lookup 10", tuple(range(41)), 5.0, 7.0, 1, 0),  # 20 tok/s
        Run("llama.cpp lookup 16", lookup16_ids, 5.0, 6.0, 1, 0),  # 40 tok/s
        Run("specdraft", draft_ids, 5.0, 5.5, 1, 10),  # 80 tok/s, MAT 4.1
    ))


def test_speedups_are_ratios_of_decode_rates():
    row = _row()
    assert row.run("plain").decode_tok_s == pytest.approx(16.0)
    assert row.speedup() == pytest.approx(5.0) and row.speedup("llama.cpp lookup 10") == pytest.approx(1.25)
    assert row.over_best_anchor() == pytest.approx(2.0)  # over lookup 16, the fastest anchor
    assert row.e2e_speedup() == pytest.approx(7.5 / 5.5)
    assert row.run("specdraft").mat == pytest.approx(4.1) and row.run("llama.cpp lookup 10").mat is None


def test_a_shared_prefill_counts_in_both_end_to_end_rates():
    row = DemoRow(P, 600, _row().runs, prefill_s=4.5)  # plain 41 tokens in 7.5 + 4.5 s, specdraft in 5.5 + 4.5 s
    assert row.e2e_speedup() == pytest.approx(12.0 / 10.0)
    assert row.speedup() == pytest.approx(5.0)  # decode rates: the prefill is not in them


def test_the_table_flags_outputs_that_differ_from_plain():
    lines = table([_row(), _row(draft_ids=tuple(range(1, 42)), lookup16_ids=(7,) * 41)]).splitlines()
    assert "plain tok/s" in lines[0] and "lookup16 tok/s" in lines[0] and "specdraft tok/s" in lines[0]
    first, second = lines[2].split(), lines[3].split()
    assert first[:7] == ["rename", "41", "16.0", "20.0", "40.0", "80.0", "4.10"]
    assert first[7:] == ["5.00x", "2.00x", "1.36x", "yes"]
    assert second[0] == "rename" and lines[3].endswith("NO (lookup16 differ)")  # no replay told where


def test_the_table_and_json_say_where_specdraft_parts_from_plain_and_whether_at_a_near_tie(tmp_path):
    parted = tuple(range(40)) + (99,)  # parts from plain at token 40
    tie = Divergence(40, 40, 99, (12.5, 12.5 - NEAR_TIE_LOGITS / 4), 12.1)
    wide = Divergence(40, 40, 99, (12.5, 12.5 - 3 * NEAR_TIE_LOGITS), 2.0)
    assert tie.near_tie and not wide.near_tie
    assert not Divergence(0, 1, 2, (1.0 + NEAR_TIE_LOGITS, 1.0), 0.5).near_tie  # the bound itself is not a tie
    rows = [DemoRow(P, 600, _row(draft_ids=parted).runs, divergence=d) for d in (tie, wide)]
    lines = table(rows).splitlines()
    assert lines[2].endswith("near-tie at token 40 (margin 0.25)") and lines[3].endswith("NO at token 40 (margin 3.00)")
    write_json(rows, tmp_path / "d.json", {})
    first, second = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert first["divergence"] == {"position": 40, "plain_token": 40, "other_token": 99, "plain_top2_logits": [12.5, 12.25],
                                   "margin": 0.25, "near_tie": True}
    assert second["divergence"]["near_tie"] is False and second["divergence"]["margin"] == 3.0


def test_json_and_chart(tmp_path):
    rows = [_row(), _row(lookup16_ids=(7,) * 41)]
    write_json(rows, tmp_path / "d.json", {"model": "m", "loadavg_before": (1.0, 1.0, 1.0)})
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["model"] == "m" and len(doc["rows"]) == 2
    r = doc["rows"][1]
    assert (r["name"], r["workload"], r["prompt_tokens"], r["speedup"]) == ("rename", "edit", 600, 5.0)
    assert r["prefill_s"] == 0.0 and r["divergence"] is None
    by_method = {run["method"]: run for run in r["runs"]}
    assert by_method["llama.cpp lookup 16"]["same_as_plain"] is False and by_method["specdraft"]["same_as_plain"]
    assert by_method["specdraft"]["decode_tok_s"] == 80.0 and by_method["specdraft"]["mat"] == pytest.approx(4.1)
    chart(rows, tmp_path / "d.png", "title")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_workloads_are_what_a_code_assistant_sees():
    assert len({p.name for p in DEMO_PROMPTS}) == len(DEMO_PROMPTS)
    assert {p.workload for p in DEMO_PROMPTS} == {"edit", "completion", "tenant"}
    for p in DEMO_PROMPTS:
        if p.kind == "chat":  # the whole ~60-line file is in the message
            code = p.prompt.split("```python\n", 1)[1]
            assert 55 <= code.count("\n") <= 70, p.name
    tests, again = select("tests,tests-again")
    assert "totals: dict" in again.prompt and "totals: dict" not in tests.prompt and "acc: dict" in tests.prompt


def test_rows_are_selected_in_demo_order_and_unknown_names_refused():
    assert [p.name for p in select("complete, rename")] == ["rename", "complete"]
    assert select(None) == select("") == DEMO_PROMPTS
    with pytest.raises(ValueError, match="rows must be among .*, got nope"):
        select("rename,nope")
