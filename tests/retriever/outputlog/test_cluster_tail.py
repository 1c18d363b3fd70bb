"""Cluster reads by change notes (`retriever.outputlog.cluster_tail`) on the real local Redis Cluster:
only noted, new or advancing tenants are read between sweeps; an entry whose note was lost is read
at the next sweep; unreadable notes fall back to reading every tenant."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from retriever.outputlog import cluster_tail
from retriever.outputlog.cluster_tail import ClusterTail
from retriever.outputlog.contract import START, LogConfig, PendingOutput, encode_tokens
from retriever.outputlog.redis_log import RedisLog, redis_client
from specdraft.bench.redis_proc import free_port

TENANTS = [f"team {i}:{{x}}" for i in range(6)]  # tags percent-encode the space, braces and colon


def output(i: int) -> bytes:
    return encode_tokens(np.arange(i, i + 5, dtype=np.int32))


async def read_all(log: RedisLog, cursors: dict[str, str]) -> dict[str, list[str]]:
    """One non-blocking read; advances `cursors`; tenant -> origins of the entries read."""
    result = await log.read(cursors, 100, 0)
    cursors.update(result.cursors)
    got: dict[str, list[str]] = {}
    for entry in result.entries:
        got.setdefault(entry.tenant, []).append(entry.origin)
    return got


async def filled(url: str) -> tuple[LogConfig, RedisLog, RedisLog, dict[str, str]]:
    """A writer that appended one output per tenant, a reader, and the reader's cursors at START."""
    config = LogConfig(redis_url=url, timeout_s=2.0)
    writer, reader = RedisLog(config), RedisLog(config)
    await writer.append([PendingOutput(t, output(i), "w", i + 1, 0.0) for i, t in enumerate(TENANTS)])
    return config, writer, reader, {t: START for t in TENANTS}


def test_only_noted_new_or_advancing_tenants_are_read_between_sweeps(redis_cluster, monkeypatch):
    monkeypatch.setattr(cluster_tail, "SWEEP_S", 60.0)

    async def body():
        config, writer, reader, cursors = await filled(redis_cluster.url)
        assert await read_all(reader, cursors) == {t: ["w"] for t in TENANTS}  # the first read: a sweep
        assert reader._tail._hot == set(TENANTS)  # each advanced: read once more (caught up?)
        assert await read_all(reader, cursors) == {}
        raw = redis_client(config, 2.0)  # an entry without a note: not read until the next sweep
        await raw.xadd(writer.keys(TENANTS[4])[0], {"o": "unnoted", "t": output(7)})
        await writer.append([PendingOutput(TENANTS[2], output(9), "w", 100, 0.0)])  # noted after its append
        assert await read_all(reader, cursors) == {TENANTS[2]: ["w"]}
        assert await read_all(reader, cursors) == {}
        assert await reader._tail.due(cursors) == []  # nothing noted, new or advancing: no tenant is asked
        assert set(await reader._tail.due({**cursors, "new": START})) == {"new"}
        reader._tail._swept_s = float("-inf")  # the sweep is due: every tenant is read, the unnoted entry too
        assert await read_all(reader, cursors) == {TENANTS[4]: ["unnoted"]}
        await raw.aclose()
        await writer.close()
        await reader.close()

    asyncio.run(body())


def test_an_entry_without_a_note_is_read_at_the_next_sweep(redis_cluster, monkeypatch):
    monkeypatch.setattr(cluster_tail, "SWEEP_S", 0.5)

    async def body():
        config, writer, reader, cursors = await filled(redis_cluster.url)
        await read_all(reader, cursors)
        await read_all(reader, cursors)
        raw = redis_client(config, 2.0)  # an append whose note was lost: XADD straight to the stream
        await raw.xadd(writer.keys(TENANTS[4])[0], {"o": "lost", "t": output(7)})
        assert await read_all(reader, cursors) == {}
        t0 = time.monotonic()
        result = await reader.read(cursors, 100, 2000)  # blocks until the sweep finds it
        assert [(e.tenant, e.origin) for e in result.entries] == [(TENANTS[4], "lost")]
        assert time.monotonic() - t0 < 1.5 and reader._tail.sweeps >= 2
        await raw.aclose()
        await writer.close()
        await reader.close()

    asyncio.run(body())


def test_unreadable_notes_mean_every_tenant_is_read_and_a_failed_note_is_counted():
    async def body():
        config = LogConfig(redis_url=f"redis+cluster://127.0.0.1:{free_port()}", timeout_s=0.3)
        client = redis_client(config, 0.3)
        tail = ClusterTail(client, "specdraft:{changes}")
        cursors = {"a": "1-0", "b": START}
        tail.advanced(cursors, dict(cursors))
        tail._cursor, tail._swept_s = "1-0", time.monotonic()  # as after a sweep: notes would decide
        assert await tail.due(cursors) == ["a", "b"] and tail._cursor is None
        await tail.note(client, ["a"])
        assert tail.notes_failed == 1
        await client.aclose()

    asyncio.run(body())
