"""The session memory budget and tenant quotas through a real server (issue 18 item 1): settings
from SPECDRAFT_* reach the drafter, refusals are RESOURCE_EXHAUSTED with their precise message,
and other tenants and health go on."""

from __future__ import annotations

import grpc

from retriever.service.settings import RetrieverSettings, default_session_memory_bytes
from tests.retriever.service.helpers import SERVING, Running, error_of, req, settings

def on_loop(running: Running, fn):
    """fn() on the server's event loop thread (the drafter is not thread-safe)."""
    import asyncio

    async def call():
        return fn()
    return asyncio.run_coroutine_threadsafe(call(), running.server._loop).result(5)


LONG = list(range(1, 2001))  # [2000] token ids: ~440 KB of session memory


def test_a_flood_past_the_session_budget_is_refused_precisely_and_the_server_stays_healthy():
    running = Running(settings(session_memory_bytes=2_000_000, tenant_max_sessions=50, evict_idle_s=3600))
    assert running.server.wait_ready(30)
    try:
        codes = []
        for i in range(10):
            try:
                running.stub.Draft(req(tenant=f"t{i % 2}", session_id=f"s{i}", prompt=LONG), timeout=5)
                codes.append("ok")
            except grpc.RpcError as e:
                codes.append(e.code())
                assert e.details().startswith("session memory must be at most 2000000 bytes, got ")
        assert "ok" in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert running.health_of("") == SERVING
        error = error_of(running.stub.Draft, req(tenant="t0", session_id="s99", prompt=LONG))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        registry = running.server._inner.servicer.metrics.registry
        memory = on_loop(running, lambda: registry.get_sample_value("specdraft_retriever_session_memory_bytes"))
        evicted = on_loop(running, lambda: registry.get_sample_value("specdraft_retriever_sessions_evicted_total"))
        assert 1_000_000 < memory <= 2_000_000 and evicted == 0
    finally:
        running.close()


def test_the_tenant_session_quota_is_per_tenant_through_the_server():
    running = Running(settings(tenant_max_sessions=2, evict_idle_s=3600))
    assert running.server.wait_ready(30)
    try:
        for i in range(2):
            running.stub.Draft(req(tenant="a", session_id=f"s{i}", prompt=LONG[:20]), timeout=5)
        error = error_of(running.stub.Draft, req(tenant="a", session_id="s2", prompt=LONG[:20]))
        assert (error.code(), error.details()) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "open sessions of tenant 'a' must be at most 2, got 3 (none idle 3600 s to evict)")
        assert running.stub.Draft(req(tenant="b", session_id="s0", prompt=LONG[:20]), timeout=5).context_tokens == 20
    finally:
        running.close()


def test_budget_settings_load_from_the_environment_with_their_defaults():
    s = RetrieverSettings.from_env({"SPECDRAFT_SESSION_MEMORY_BYTES": "123456789", "SPECDRAFT_MAX_TENANTS": "7",
                                    "SPECDRAFT_MAX_STREAMS_PER_PEER": "5", "SPECDRAFT_STREAM_IDLE_S": "2.5"})
    config = s.drafter_config()
    assert (config.session_memory_bytes, config.max_tenants) == (123456789, 7)
    assert (s.max_streams_per_peer, s.stream_idle_s) == (5, 2.5)
    assert RetrieverSettings().drafter_config().session_memory_bytes == default_session_memory_bytes() > 0
    try:
        RetrieverSettings.from_env({"SPECDRAFT_TENANT_MAX_SESSIONS": "0"})
        raise AssertionError("0 must be refused")
    except ValueError as e:
        assert "SPECDRAFT_TENANT_MAX_SESSIONS must be an integer >= 1, got 0" in str(e)
