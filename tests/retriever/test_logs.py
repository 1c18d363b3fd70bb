"""`SummaryLog`: a repeated line is written once per kind per interval, with the count it stands for."""

from __future__ import annotations

import logging

import pytest

from retriever.logs import SummaryLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_kind_per_interval_with_the_count_of_the_rest(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    summary = SummaryLog(logging.getLogger("t.summary"), interval_s=10, clock=clock)
    written = [summary.note("a", "refused %s", i) for i in range(1000)]
    assert written[0] and not any(written[1:])
    assert summary.note("b", "other kind")
    clock.now += 10
    assert summary.note("a", "refused %s", "late")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused 0", "other kind", "refused late (+999 more like it in the last 10.0 s)"]


def test_kinds_beyond_the_cap_share_one(caplog):
    caplog.set_level(logging.INFO)
    summary = SummaryLog(logging.getLogger("t.summary"), interval_s=10, max_kinds=2, clock=Clock())
    assert [summary.note(f"k{i}", "x") for i in range(5)] == [True, True, True, False, False]
    assert len(caplog.records) == 3
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        SummaryLog(logging.getLogger("t"), interval_s=0)
