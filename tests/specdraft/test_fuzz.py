"""`specdraft fuzz`: each target bounded (a fixed count, a time cap), with 0 failures and the
outcomes that show the check can fail (rejections happened; a dying loader is reported)."""

from __future__ import annotations

import json
import time
from collections import Counter

from specdraft.cli import main
from specdraft.fuzz.cli import run_target
from specdraft.fuzz.index import _child


def test_corrupted_indexes_are_rejected_cleanly_and_never_crash():
    report = run_target("index", seconds=20, seed=1, count=250)
    by_result = Counter(o.result for o in report.outcomes)
    print("\n".join(report.lines()[:3]))
    assert report.tried >= 100 and not report.failures, report.lines()
    assert by_result["rejected"] >= 0.7 * report.tried  # almost every mutation hits a checked byte
    kinds = {o.detail for o in report.outcomes if o.result == "rejected"}
    assert any("sha256" in k for k in kinds) and any("size" in k for k in kinds)
    assert any("format_version" in k for k in kinds)


def test_a_dying_loader_is_reported_as_a_crash():
    outcomes = _child(json.dumps([["/nonexistent/base"], 0, time.time() + 5, 1]))  # the child raises and exits 1
    assert [o.result for o in outcomes] == ["crashed"] and "exit code 1" in outcomes[0].detail


def test_random_and_malformed_requests_get_expected_answers(capsys):
    assert main(["fuzz", "requests", "--seconds", "15", "--count", "400", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fuzz requests: 40") and "invalid_argument" in out and "ok" in out, out
    assert "FAILED" not in out


def test_tree_builder_matches_its_contract_and_references():
    report = run_target("tree", seconds=15, seed=3, count=300)
    assert report.tried == 300 and not report.failures, report.lines()
    assert {o.detail for o in report.outcomes} == {"contract and reference"}
