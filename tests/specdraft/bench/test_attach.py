"""`specdraft bench attach` end to end on SmolLM2-135M: a retriever started in-process, plain `generate`
and two attachment calls per copy task, the table and the JSON; bad flags refused before anything loads."""

import json

import pytest

from specdraft.bench.attach import AttachCall, AttachResult, AttachTask, source_of
from specdraft.cli import main


def test_bench_attach_times_plain_and_each_call_with_the_same_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECDRAFT_DATA_DIR", str(tmp_path / "data"))  # the in-process retriever's file log
    out = tmp_path / "attach.json"
    assert main(["bench", "attach", "--functions", "textwrap.dedent", "--max-new-tokens", "24", "--calls", "2",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    [task] = doc["tasks"]
    assert task["function"] == "textwrap.dedent" and task["plain_tokens"] == 24 and task["plain_s"] > 0
    assert len(task["calls"]) == 2 and all(c["same_as_plain"] and c["new_tokens"] == 24 for c in task["calls"])
    assert task["calls"][1]["steps"] < 24  # the second call drafts from the first call's output
    assert "| textwrap.dedent |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--functions", "textwrap.nope"], "--functions must name module.function with Python source"),
    (["--functions", "len"], "--functions must name module.function with Python source"),
    (["--calls", "0"], "--max-new-tokens and --calls must be >= 1"),
])
def test_bad_flags_are_refused_before_the_model_loads(argv, message, capsys):
    assert main(["bench", "attach", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_table_shows_each_call_over_plain():
    calls = (AttachCall(2.0, 120, 15, True), AttachCall(1.0, 120, 5, False))
    result = AttachResult("m", 120, True, (AttachTask("f.g", 100, 4.0, 120, calls),))
    assert result.tasks[0].speedup(0) == 2.0 and result.tasks[0].speedup(1) == 4.0
    assert "| f.g | 100 | 4.00 | 2.00 (2.00x, 15) | 1.00 (4.00x, 5) | NO |" in result.table()
    assert source_of("textwrap.dedent").startswith("def dedent(")
