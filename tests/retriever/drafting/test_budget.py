"""Drafter bounds (issue 18 item 1): the session memory budget, per-tenant session and token quotas,
eviction of idle sessions before a refusal, and bounded tenant state."""

import numpy as np
import pytest

from retriever.drafting.drafter import Drafter
from retriever.drafting.types import DrafterConfig
from retriever.errors import ResourceExhausted

EMPTY = np.empty(0, np.int32)
HOUR = 3600.0  # evict_idle_s: no session is idle long enough to be evicted


def prompt(n: int, seed: int = 0) -> np.ndarray:  # [n] int32
    return np.random.default_rng(seed).integers(1, 50_000, n, dtype=np.int32)


def accounted(d: Drafter) -> int:
    """The sessions' memory summed the slow way (what the running total must equal)."""
    return sum(s.core.memory_bytes + s.rewrites_bytes
               + sum(ix.memory_bytes for ix in (s.reference, s.prediction) if ix is not None)
               for s in d._sessions.values())


def test_memory_budget_refuses_with_a_precise_message_and_the_running_total_stays_exact():
    budget = 2_000_000
    d = Drafter(DrafterConfig(session_memory_bytes=budget, evict_idle_s=HOUR))
    opened = 0
    with pytest.raises(ResourceExhausted, match=rf"^session memory must be at most {budget} bytes, got (\d+) bytes"):
        for i in range(100):  # ~430 KB each: the budget holds 4
            d.draft(f"t{i % 3}", f"s{i}", prompt(2000, i), EMPTY, 8)
            opened += 1
    assert 1 <= opened < 10
    assert d.stats().memory_bytes >= accounted(d) == d._session_bytes <= budget
    d.draft("t0", "s0", None, prompt(100, 99), 8)  # extended, restarted and ended: the total follows
    d.draft("t1", "s1", prompt(100, 7), EMPTY, 8)
    d.end_session("t2", "s2")
    assert d._session_bytes == accounted(d)
    d.draft("t2", "again", prompt(2000, 5), EMPTY, 8)  # room again after the end
    assert d._session_bytes == accounted(d) <= budget


def test_idle_sessions_are_evicted_before_a_refusal_and_their_output_kept():
    outputs = []
    d = Drafter(DrafterConfig(session_memory_bytes=2_000_000, evict_idle_s=0.0),
                on_output=lambda tenant, tokens: outputs.append(tenant))
    for i in range(40):
        d.draft("t", f"s{i}", prompt(2000, i), EMPTY, 8)
        d.draft("t", f"s{i}", None, prompt(4, i), 8)  # an output, handed on at eviction
    assert d.evicted >= 30 and len(d._sessions) < 10 and len(outputs) == d.evicted
    assert d._session_bytes == accounted(d) <= 2_000_000


def test_tenant_session_quota_evicts_the_tenants_idle_sessions_else_refuses():
    d = Drafter(DrafterConfig(tenant_max_sessions=3, evict_idle_s=HOUR))
    for i in range(3):
        d.draft("a", f"s{i}", prompt(10, i), EMPTY, 8)
    with pytest.raises(ResourceExhausted, match=r"^open sessions of tenant 'a' must be at most 3, got 4 "):
        d.draft("a", "s3", prompt(10), EMPTY, 8)
    d.draft("b", "s0", prompt(10), EMPTY, 8)  # another tenant is not affected
    d.draft("a", "s0", prompt(10), EMPTY, 8)  # a restart is not a new session
    lax = Drafter(DrafterConfig(tenant_max_sessions=3, evict_idle_s=0.0))
    for i in range(10):
        lax.draft("a", f"s{i}", prompt(10, i), EMPTY, 8)
    assert len(lax._tenants["a"].sessions) == 3 and lax.evicted == 7


def test_tenant_token_quota_covers_starts_and_extensions():
    d = Drafter(DrafterConfig(tenant_max_tokens=100, evict_idle_s=HOUR))
    d.draft("a", "s0", prompt(60), EMPTY, 8)
    with pytest.raises(ResourceExhausted, match=r"^context tokens of tenant 'a''s open sessions must be at most 100, "
                                                r"got 110 "):
        d.draft("a", "s1", prompt(50), EMPTY, 8)
    with pytest.raises(ResourceExhausted, match=r"must be at most 100, got 101 "):
        d.draft("a", "s0", None, prompt(41), 8)
    d.draft("a", "s0", None, prompt(40), 8)
    d.draft("b", "s0", prompt(100), EMPTY, 8)
    assert d._tenants["a"].context_tokens == 100


def test_tenants_without_outputs_are_dropped_and_tenants_held_are_capped():
    d = Drafter(DrafterConfig(max_tenants=10))
    for i in range(1000):  # one-call tenants with no output: nothing kept
        d.draft(f"t{i}", "s", prompt(20, i), EMPTY, 8)
        d.end_session(f"t{i}", "s")
    assert len(d._tenants) == 0
    for i in range(30):  # tenants with prior outputs: the least recently used beyond 10 go
        d.add_prior_output(f"o{i}", prompt(20, i))
    assert len(d._tenants) == 10 and "o29" in d._tenants and "o0" not in d._tenants
    for i in range(10):
        d.draft(f"busy{i}", "s", prompt(20, i), EMPTY, 8)
    with pytest.raises(ResourceExhausted, match=r"^tenants held must be at most 10, got 11 \(all have open sessions\)"):
        d.draft("new", "s", prompt(20), EMPTY, 8)
    d.add_prior_output("late", prompt(20))  # dropped, not raised: every tenant held has sessions
    assert "late" not in d._tenants and len(d._tenants) == 10


def test_stats_report_the_session_memory_and_evictions():
    d = Drafter(DrafterConfig(tenant_max_sessions=1, evict_idle_s=0.0))
    d.draft("a", "s0", prompt(50), EMPTY, 8)
    d.draft("a", "s1", prompt(50), EMPTY, 8)
    stats = d.stats()
    assert (stats.sessions, stats.evicted, stats.session_bytes) == (1, 1, accounted(d))
