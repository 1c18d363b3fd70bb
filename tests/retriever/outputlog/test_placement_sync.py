"""Replicas sharing tenants by placement, on one Redis and on a Redis Cluster: membership with a TTL,
each replica tailing only the tenants it owns, warming a newly owned tenant, freeing a lost one."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from retriever.drafting.drafter import Drafter
from retriever.drafting.types import DrafterConfig, Source
from retriever.outputlog.contract import LogConfig, PendingOutput, encode_tokens
from retriever.outputlog.membership import Membership, Placement, PlacementConfig
from retriever.outputlog.sync import LogSync, open_log
from retriever.placement import Member, owners
from tests.retriever.outputlog.test_sync import EMPTY, ids, until

TENANTS = [f"team-{i}" for i in range(24)]


def output_of(tenant: str) -> np.ndarray:
    return ids(10_000 + 100 * TENANTS.index(tenant), 40)


_MADE: list["PlacedReplica"] = []  # the replicas `run_stopping`'s body made


def run_stopping(body) -> None:
    """asyncio.run(body()), then every PlacedReplica the body made is stopped, failed or not:
    `LogSync.stop` cancels its tasks until they end, where asyncio.run's own clean-up cancels once
    and on Python 3.11 a redis-py command can lose that cancellation (a failed assertion then hung
    the suite instead of failing it)."""
    async def main() -> None:
        try:
            await body()
        finally:
            for replica in _MADE:
                await replica.sync.stop(flush_s=0)
            _MADE.clear()
    asyncio.run(main())


class PlacedReplica:
    def __init__(self, config: LogConfig, name: str) -> None:
        placement = Placement(Membership(config), PlacementConfig(name, f"{name}:1", owners=2, ttl_s=1.0,
                                                                  heartbeat_s=0.1))
        self.sync = LogSync(open_log(config), config, placement=placement)
        self.drafter = Drafter(DrafterConfig(), on_output=self.sync.publish)
        self.name = name
        _MADE.append(self)

    def indexed(self) -> set[str]:
        return {t for t in TENANTS if self.proposes(t)}

    def proposes(self, tenant: str) -> bool:
        out = output_of(tenant)
        tree = self.drafter.draft(tenant, f"probe-{time.monotonic_ns()}", out[:10], EMPTY, 8).tree
        return len(tree) > 0 and int(tree.token_ids[0]) == int(out[10]) and int(tree.sources[0]) == Source.TENANT


@pytest.fixture(params=["redis_server", "redis_cluster"])
def config(request):
    return LogConfig(redis_url=request.getfixturevalue(request.param).url, timeout_s=0.3, discover_s=0.05)


def test_membership_lists_live_members_and_drops_one_past_its_ttl(config):
    async def body():
        m = Membership(config)
        await m.register(Member("a", "h:1", 2), ttl_s=5.0)
        await m.register(Member("b", "h:2"), ttl_s=0.3)
        assert await m.members() == (Member("a", "h:1", 2), Member("b", "h:2"))
        await asyncio.sleep(0.4)
        assert await m.members() == (Member("a", "h:1", 2),)  # b stopped heartbeating: out
        await m.leave("a")
        assert await m.members() == ()
        await m.close()

    asyncio.run(body())


def test_replicas_index_only_owned_tenants_take_over_a_leaver_and_free_lost_ones(config):
    async def body():
        writer = open_log(config)
        await writer.append([PendingOutput(t, encode_tokens(output_of(t)), "writer", i + 1, 0.0)
                             for i, t in enumerate(TENANTS)])
        replicas = [PlacedReplica(config, n) for n in ("a", "b", "c")]
        for r in replicas * 2:  # all three listed before any tails: nobody warms what it does not own
            await r.sync.placement.refresh()
        for r in replicas:
            await r.sync.start(r.drafter)
        members = [Member(n, f"{n}:1") for n in ("a", "b", "c")]
        owned = {r.name: {t for t in TENANTS if r.name in [m.replica_id for m in owners(t, members, 2)]}
                 for r in replicas}
        for r in replicas:
            await until(lambda: r.sync.warm and r.sync.placement.members == tuple(members), timeout_s=5.0)
            assert r.indexed() == owned[r.name]  # only its own share: 2 of 3 replicas hold each tenant
            assert all(r.sync.ready(t) == (t in owned[r.name]) for t in TENANTS)
        assert sum(len(s) for s in owned.values()) == 2 * len(TENANTS)
        a, b, c = replicas
        await c.sync.stop()  # leaves: a and b own everything now, each warms what it lacked
        for r in (a, b):
            await until(lambda: len(r.sync.placement.members) == 2 and all(r.sync.ready(t) for t in TENANTS),
                        timeout_s=5.0)
            assert r.indexed() == set(TENANTS)
        d = PlacedReplica(config, "d")  # joins: a and b hand some tenants over and free them
        await d.sync.placement.refresh()
        await d.sync.start(d.drafter)
        members = [Member(n, f"{n}:1") for n in ("a", "b", "d")]
        for r in (a, b, d):
            mine = {t for t in TENANTS if r.name in [m.replica_id for m in owners(t, members, 2)]}
            await until(lambda: len(r.sync.placement.members) == 3 and r.indexed() == mine, timeout_s=5.0)
        assert a.sync.health().dropped_tenants + b.sync.health().dropped_tenants > 0
        for r in (a, b, d):
            await r.sync.stop()
        await writer.close()

    run_stopping(body)


def test_replicas_started_together_never_tail_a_tenant_they_do_not_own(config):
    """Started 0.1 s apart (TTL 1 s: a loaded 2-core CI machine once stalled the loop past the
    0.4 s margin 0.3 s apart left): each waits for the member list to hold still before tailing,
    so none warms every tenant first and frees two thirds of them after (a memory spike)."""
    async def body():
        writer = open_log(config)
        await writer.append([PendingOutput(t, encode_tokens(output_of(t)), "writer", i + 1, 0.0)
                             for i, t in enumerate(TENANTS)])
        replicas = [PlacedReplica(config, n) for n in ("a", "b", "c")]
        for r in replicas:
            await r.sync.start(r.drafter)
            await asyncio.sleep(0.1)
        members = [Member(n, f"{n}:1") for n in ("a", "b", "c")]
        for r in replicas:
            mine = {t for t in TENANTS if r.name in [m.replica_id for m in owners(t, members, 2)]}
            await until(lambda: r.sync.warm and r.sync.placement.members == tuple(members), timeout_s=5.0)
            assert r.indexed() == mine, (r.name, sorted(r.indexed() ^ mine))
            assert r.sync.health().dropped_tenants == 0, (r.name, r.sync.health())
        for r in replicas:
            await r.sync.stop()
        await writer.close()

    run_stopping(body)


def test_newly_owned_tenants_warm_a_few_per_read_and_none_serves_before_its_replay(config, monkeypatch):
    from retriever.outputlog import sync as sync_module

    monkeypatch.setattr(sync_module, "WARM_PER_READ", 2)

    async def body():
        writer = open_log(config)
        await writer.append([PendingOutput(t, encode_tokens(output_of(t)), "writer", i + 1, 0.0)
                             for i, t in enumerate(TENANTS)])
        a, c = PlacedReplica(config, "a"), PlacedReplica(config, "c")
        for r in (a, c, a, c):
            await r.sync.placement.refresh()
        for r in (a, c):
            await r.sync.start(r.drafter)
        await until(lambda: a.sync.warm and len(a.sync.placement.members) == 2, timeout_s=5.0)
        assert all(a.sync.ready(t) for t in TENANTS)  # R = 2 of 2: a owns everything already
        b = PlacedReplica(config, "b")
        await b.sync.placement.refresh()
        await b.sync.start(b.drafter)
        await until(lambda: b.sync.warm and len(b.sync.placement.members) == 3, timeout_s=5.0)
        mine = {t for t in TENANTS if b.sync.ready(t)}
        progress: list[int] = []  # tenants ready after each read that finished some replays
        unready: list[str] = []  # ready before its own replay was in (must stay empty)
        caught_up = b.sync._caught_up

        def record(tenants):  # on b's loop, right after a read's entries were applied
            caught_up(tenants)
            ready = {t for t in TENANTS if b.sync.ready(t)}
            unready.extend(t for t in ready - mine if not b.proposes(t))
            progress.append(len(ready))
        monkeypatch.setattr(b.sync, "_caught_up", record)
        await c.sync.stop()  # leaves: b now owns every tenant, and warms those it lacked
        await until(lambda: all(b.sync.ready(t) for t in TENANTS), timeout_s=5.0)
        assert b.indexed() == set(TENANTS) and unready == []
        assert len(mine) < len(TENANTS) - 4  # enough newly owned tenants for three reads of 2
        # some newly owned tenants served while others still warmed: states between mine and all
        assert len({n for n in progress if len(mine) < n < len(TENANTS)}) >= 2
        for r in (a, b):
            await r.sync.stop()
        await writer.close()

    run_stopping(body)


def test_an_unreachable_cluster_is_a_log_unavailable_and_the_heartbeat_goes_on():
    from retriever.outputlog.contract import LogUnavailable
    from specdraft.bench.redis_proc import free_port

    config = LogConfig(redis_url=f"redis+cluster://127.0.0.1:{free_port()}", timeout_s=0.2)

    async def body():
        m = Membership(config)
        with pytest.raises(LogUnavailable, match="membership must be writable"):  # not RedisClusterException
            await m.register(Member("a", "h:1"), ttl_s=1.0)
        placement = Placement(Membership(config), PlacementConfig("a", "h:1", ttl_s=1.0, heartbeat_s=0.05))
        task = asyncio.create_task(placement.run())
        await asyncio.sleep(0.3)
        assert not task.done() and not placement.listed  # still heartbeating, never listed
        task.cancel()
        await m.close()

    asyncio.run(body())


def test_a_replica_stalled_by_a_gil_heavy_stretch_stays_listed_at_the_default_ttl(config):
    """At the default TTL and heartbeat (settings) a stall of the replica's loop longer than the TTL,
    holding the GIL most of the time (e.g. a long replay), never drops it (the heartbeat has a thread
    of its own); a replica that stops is out within TTL + a heartbeat."""
    import threading

    from retriever.service.settings import RetrieverSettings

    settings = RetrieverSettings()
    ttl_s, heartbeat_s = settings.membership_ttl_s, settings.heartbeat_s
    stalled: list[float] = []
    stop = threading.Event()

    async def replica_a():
        placement = Placement(Membership(config), PlacementConfig("a", "h:1", ttl_s, heartbeat_s))
        task = asyncio.create_task(placement.run())
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < ttl_s + 0.5:  # no await: the loop (and its heartbeat) stalls
            sum(range(2000))
        stalled.append(time.perf_counter() - t0)
        while not stop.is_set():
            await asyncio.sleep(0.02)
        task.cancel()  # killed: no leave

    thread = threading.Thread(target=lambda: asyncio.run(replica_a()))

    async def observe():
        m = Membership(config)
        thread.start()
        await asyncio.sleep(0.3)
        seen = []
        while not stalled or len(seen) < 40:
            seen.append("a" in {x.replica_id for x in await m.members()})
            await asyncio.sleep(0.05)
        stop.set()
        t0 = time.monotonic()
        while "a" in {x.replica_id for x in await m.members()} and time.monotonic() - t0 < 3 * ttl_s:
            await asyncio.sleep(0.05)
        await m.close()
        return seen, time.monotonic() - t0

    seen, out_s = asyncio.run(observe())
    thread.join(5)
    assert stalled and stalled[0] >= ttl_s + 0.5 and all(seen), seen
    assert out_s <= ttl_s + heartbeat_s + 0.3
