"""`specdraft bench abuse` (retriever part) at a small scale against real server processes: the
flood is refused once the session budget is reached and the tenants it leaves cost nothing; idle
streams are all held while health and a fresh client's Drafts succeed (latency is only printed)."""

from specdraft.bench.abuse import AbuseResult, run_flood, run_streams


def test_flood_is_refused_at_the_budget_and_idle_streams_leave_health_and_draft_working():
    flood = run_flood(budget_mib=16, sessions=200, prompt_tokens=2000, tenants=200, clients=2)
    assert flood.refused > 0 and flood.other_errors == 0 and flood.accepted + flood.refused == 200
    assert flood.accepted <= 16 * 2**20 // (2000 * 200)  # ~440 KB a session
    streams = run_streams(50)
    assert streams.held == 50 and streams.health_failed == streams.draft_failed == 0
    assert streams.health_ok == streams.draft_ok > 0
    assert "session flood" in AbuseResult(flood, streams).table()
