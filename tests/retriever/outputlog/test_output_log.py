"""The `OutputLog` contract, run against both stores (a real redis-server and SQLite files)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from retriever.outputlog.contract import START, LogConfig, LogUnavailable, PendingOutput, decode_tokens, encode_tokens
from retriever.outputlog.file_log import FileLog
from retriever.outputlog.redis_log import RedisLog, tenant_tag
from tests.redis_fixtures import free_port

TENANT = "acme{x}:1/é"  # braces, colon, slash, non-ASCII: all must be encoded in keys


def item(tenant: str, tokens, seq: int, origin: str = "A") -> PendingOutput:
    return PendingOutput(tenant, encode_tokens(np.asarray(tokens, np.int32)), origin, seq, time.monotonic())


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["redis", "cluster", "file"])
def make_log(request, tmp_path):
    """make_log(**config) -> a fresh log of the parametrized store (same store on each call)."""
    if request.param in ("redis", "cluster"):
        server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
        return lambda **kw: RedisLog(LogConfig(redis_url=server.url, **kw))
    return lambda **kw: FileLog(LogConfig(data_dir=str(tmp_path / "data"), **kw))


async def read_all(log, tenants, count=1000):
    result = await log.read({t: START for t in tenants}, count, 0)
    return list(result.entries), result.cursors


def test_tokens_round_trip_as_int32_little_endian():
    tokens = np.array([0, 1, 151_935, 2**31 - 1, -1], np.int32)
    assert encode_tokens(tokens) == b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens)
    assert decode_tokens(encode_tokens(tokens)).tolist() == tokens.tolist()
    with pytest.raises(ValueError, match="multiple of 4 bytes, got 5"):
        decode_tokens(b"12345")


def test_append_then_read_in_order_with_cursors(make_log):
    async def body():
        log = make_log()
        await log.append([item(TENANT, [1, 2, 3], 1), item(TENANT, [151_935, 7], 2, "B"), item("other", [9], 3)])
        entries, cursors = await read_all(log, [TENANT])
        assert [(e.tenant, e.origin, e.tokens.tolist()) for e in entries] == [
            (TENANT, "A", [1, 2, 3]), (TENANT, "B", [151_935, 7])]
        assert all(e.tokens.dtype == np.int32 for e in entries)
        assert (await log.read(cursors, 1000, 0)).entries == ()
        await log.append([item(TENANT, [4], 4)])
        more = await log.read(cursors, 1000, 0)
        assert [e.tokens.tolist() for e in more.entries] == [[4]]
        first_only = await log.read({TENANT: START}, 1, 0)
        assert [e.tokens.tolist() for e in first_only.entries] == [[1, 2, 3]]
        assert sorted(await log.tenants()) == sorted([TENANT, "other"])
        size = await log.size()
        assert (size.tenants, size.entries, size.tokens) == (2, 4, 7)
        await log.close()

    run(body())


def test_append_is_idempotent_per_origin_and_seq(make_log):
    async def body():
        log = make_log(token_budget=4)
        batch = [item("t", [1, 2, 3], 1), item("t", [4, 5, 6], 2)]
        await log.append(batch)
        await log.append(batch)  # a retry after a lost reply; entry 1 was even trimmed meanwhile
        await log.append([item("t", [7], 2, origin="B")])  # another publisher's seq 2 is new
        entries, _ = await read_all(log, ["t"])
        assert [(e.origin, e.tokens.tolist()) for e in entries] == [("A", [4, 5, 6]), ("B", [7])]
        await log.close()

    run(body())


def test_trimming_keeps_each_tenant_under_its_token_budget(make_log):
    async def body():
        log = make_log(token_budget=100)
        await log.append([item("t", np.full(30, i, np.int32), i + 1) for i in range(5)])  # 150 tokens
        await log.append([item("u", [1], 100)])
        entries, _ = await read_all(log, ["t", "u"])
        assert [int(e.tokens[0]) for e in entries if e.tenant == "t"] == [2, 3, 4]  # 90 tokens, newest kept
        assert [e.tokens.tolist() for e in entries if e.tenant == "u"] == [[1]]  # budgets are per tenant
        await log.append([item("t", np.arange(250, dtype=np.int32), 6)])  # larger than the budget
        entries, _ = await read_all(log, ["t"])
        assert [len(e.tokens) for e in entries] == [250]  # the newest entry always stays
        assert (await log.size()).tokens == 251
        await log.close()

    run(body())


def test_tenants_are_isolated_even_with_look_alike_names(make_log):
    names = ["a:b", "a%3Ab", "a", "{a}", "a}"]
    async def body():
        log = make_log()
        await log.append([item(name, [i], i + 1) for i, name in enumerate(names)])
        for i, name in enumerate(names):
            entries, _ = await read_all(log, [name])
            assert [(e.tenant, e.tokens.tolist()) for e in entries] == [(name, [i])]
        assert sorted(await log.tenants()) == sorted(names)
        await log.close()

    run(body())


def test_blocking_read_wakes_on_append(make_log):
    async def body():
        log, writer = make_log(), make_log()
        _, cursors = await read_all(log, ["t"])
        t0 = time.monotonic()
        reader = asyncio.create_task(log.read({"t": START}, 10, 3000))
        await asyncio.sleep(0.05)
        await writer.append([item("t", [5], 1)])
        result = await reader
        assert [e.tokens.tolist() for e in result.entries] == [[5]]
        assert time.monotonic() - t0 < 1.0
        empty = await log.read(result.cursors, 10, 100)  # nothing new: returns after ~block_ms
        assert empty.entries == () and empty.cursors == result.cursors
        await log.close()
        await writer.close()

    run(body())


def test_redis_keys_are_hash_tagged_per_tenant_and_tokens_compact(redis_server):
    async def body():
        log = RedisLog(LogConfig(redis_url=redis_server.url))
        await log.append([item(TENANT, [1, 256], 1)])
        await log.close()

    run(body())
    tag = tenant_tag(TENANT)
    assert tag == "acme%7Bx%7D%3A1%2F%C3%A9" and set("{}:") & set(tag) == set()
    client = redis.Redis.from_url(redis_server.url)
    assert sorted(k.decode() for k in client.keys("*")) == sorted(
        [f"specdraft:{{{tag}}}:outputs", f"specdraft:{{{tag}}}:tokens", f"specdraft:{{{tag}}}:seqs",
         "specdraft:tenants"])
    (_, fields), = client.xrange(f"specdraft:{{{tag}}}:outputs")
    assert fields == {b"o": b"A", b"t": b"\x01\x00\x00\x00\x00\x01\x00\x00"}
    assert client.smembers("specdraft:tenants") == {TENANT.encode()}


def test_cluster_keys_of_a_tenant_share_one_slot_and_wait_reaches_a_replica(redis_cluster):
    async def body():
        log = RedisLog(LogConfig(redis_url=redis_cluster.url, wait_replicas=1, wait_ms=1000))
        assert log.cluster
        await log.append([item(f"w{i}", [i, i], 1) for i in range(20)])  # spread over the three masters
        await log.close()

    run(body())
    slots = set()
    for i in range(20):
        keys = [f"specdraft:{{w{i}}}:{k}" for k in ("outputs", "tokens", "seqs")]
        slots.add(redis_cluster.command(redis_cluster.alive()[0], "CLUSTER", "KEYSLOT", keys[0]).strip())
        owner = redis_cluster.master_of(keys[0])
        assert all(redis_cluster.master_of(k) is owner for k in keys)
        assert redis_cluster.command(owner, "EXISTS", *keys).strip() == "3"
    assert len(slots) == 20 and len({redis_cluster.master_of(f"{{w{i}}}").port for i in range(20)}) == 3


def test_cluster_url_parsing_and_errors_hide_the_password():
    from retriever.outputlog.redis_log import parse_cluster_url

    a = parse_cluster_url("redis+cluster://u:p%40ss@h1:7000,[::1]:7001/")
    assert (a.seeds, a.tls, a.username, a.password) == ((("h1", 7000), ("::1", 7001)), False, "u", "p@ss")
    assert parse_cluster_url("rediss+cluster://h:1").tls
    for bad in ("redis+cluster://u:hunter2@h1", "redis+cluster://u:hunter2@h1:x,h2:1", "redis+cluster://"):
        with pytest.raises(ValueError, match="must list host:port seeds") as error:
            parse_cluster_url(bad)
        assert "hunter2" not in str(error.value)
    from retriever.service.settings import RetrieverSettings

    assert RetrieverSettings(redis_url="redis+cluster://h:1,h:2").log_config().redis_url.startswith("redis+cluster")
    with pytest.raises(ValueError, match="SPECDRAFT_REDIS_URL must be empty or a redis://"):
        RetrieverSettings(redis_url="cluster://h:1")


def test_redis_unix_socket_and_acl_user(make_redis):
    server = make_redis(extra=("--user", "default", "off", "--user", "drafter", "on", ">s3cret", "~specdraft:*",
                               "+@all"))

    async def body():
        for url in (server.url, server.unix_url):
            log = RedisLog(LogConfig(redis_url=url, redis_username="drafter", redis_password="s3cret"))
            await log.append([item("t", [1], 1)])
            assert len((await read_all(log, ["t"]))[0]) == 1
            await log.close()
        wrong = RedisLog(LogConfig(redis_url=server.url, redis_username="drafter", redis_password="nope"))
        with pytest.raises(LogUnavailable, match="redis append must succeed"):
            await wrong.append([item("t", [1], 2)])
        await wrong.close()

    run(body())


def test_redis_down_fails_fast_with_log_unavailable():
    async def body():
        log = RedisLog(LogConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2))
        t0 = time.monotonic()
        with pytest.raises(LogUnavailable, match="redis append must succeed, got ConnectionError"):
            await log.append([item("t", [1], 1)])
        with pytest.raises(LogUnavailable, match="redis read must succeed"):
            await log.read({"t": START}, 10, 100)
        assert time.monotonic() - t0 < 1.0
        await log.close()

    run(body())


def test_bad_redis_url_is_a_precise_error_without_the_password():
    with pytest.raises(ValueError, match="SPECDRAFT_REDIS_URL must be a redis://") as error:
        RedisLog(LogConfig(redis_url="http://user:hunter2@localhost"))
    assert "hunter2" not in str(error.value) and "user:***@localhost" in str(error.value)
    assert "hunter2" not in repr(LogConfig(redis_url="redis://u:hunter2@h", redis_password="hunter2"))


def test_file_log_survives_restart_and_rejects_other_formats(tmp_path):
    config = LogConfig(data_dir=str(tmp_path))

    async def write():
        log = FileLog(config)
        await log.append([item("t", [1, 2], 1)])
        await log.close()

    async def read():
        log = FileLog(config)
        entries, _ = await read_all(log, ["t"])
        await log.close()
        return [e.tokens.tolist() for e in entries]

    run(write())
    assert run(read()) == [[1, 2]]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log").mkdir()
    (tmp_path / "bad" / "log" / "outputs.sqlite3").mkdir()  # not a file at all: no quarantine, an error
    with pytest.raises(LogUnavailable, match="must be a writable SQLite file"):
        FileLog(LogConfig(data_dir=str(tmp_path / "bad")))


def test_file_log_has_no_torn_entries_after_kill_9(tmp_path):
    writer = textwrap.dedent(f"""
        import asyncio, time, numpy as np
        from retriever.outputlog.file_log import FileLog
        from retriever.outputlog.contract import LogConfig, PendingOutput, encode_tokens
        async def main():
            log = FileLog(LogConfig(data_dir={str(tmp_path)!r}, token_budget=200_000))
            seq = 0
            while True:
                batch = []
                for _ in range(8):
                    seq += 1
                    batch.append(PendingOutput("t", encode_tokens(np.full(1000 + seq % 7, seq, np.int32)),
                                               "w", seq, time.monotonic()))
                await log.append(batch)
                print(seq, flush=True)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[3]))
    for _ in range(30):  # let it commit a few hundred entries, then kill it mid-write
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    async def check():
        log = FileLog(LogConfig(data_dir=str(tmp_path)))
        entries = []
        cursors = {"t": START}
        while True:
            result = await log.read(cursors, 1000, 0)
            if not result.entries:
                break
            entries += result.entries
            cursors = result.cursors
        size = await log.size()
        await log.close()
        return entries, size

    entries, size = run(check())
    assert len(entries) >= 8 * 30 - 200_000 // 1000
    for e in entries:
        seq = int(e.tokens[0])
        assert e.tokens.tolist() == [seq] * (1000 + seq % 7)  # whole entries only
    assert size.tokens == sum(len(e.tokens) for e in entries) <= 200_000 + 1006


def _corrupt_log(tmp_path: Path, entries: int) -> Path:
    """A real log of `entries` outputs (entry i: 300 tokens of value i, tenant t{i % 3}),
    checkpointed, then ten pages in its middle overwritten with garbage."""
    async def write():
        log = FileLog(LogConfig(data_dir=str(tmp_path), token_budget=10**9))
        for i in range(entries):
            await log.append([item(f"t{i % 3}", np.full(300, i, np.int32), i + 1)])
        await log.close()

    run(write())
    path = tmp_path / "log" / "outputs.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    pages = path.stat().st_size // 4096
    with open(path, "r+b") as f:
        f.seek(pages // 2 * 4096)
        f.write(bytes(range(256)) * 16 * 10)
    return path


def test_a_corrupt_file_log_is_quarantined_and_what_can_be_read_is_kept(tmp_path, caplog):
    path = _corrupt_log(tmp_path, 400)
    caplog.set_level(logging.ERROR)

    async def body():
        log = FileLog(LogConfig(data_dir=str(tmp_path)))
        result = await log.read({f"t{k}": START for k in range(3)}, 1000, 0)  # malformed -> quarantine
        await log.append([item("t0", [7, 7], 1, origin="new")])
        after = await log.read(result.cursors, 1000, 0)
        size = await log.size()
        await log.close()
        return result.entries, after.entries, size

    kept, after, size = run(body())
    values = sorted(int(e.tokens[0]) for e in kept)
    assert 300 <= len(kept) < 400 and values == sorted(set(values)) and 0 in values and 399 in values
    assert all(e.tokens.tolist() == [int(e.tokens[0])] * 300 for e in kept)
    assert [(e.tokens.tolist(), int(e.entry_id) > 400) for e in after] == [([7, 7], True)]  # ids continue
    assert size.entries == len(kept) + 1
    aside = [p for p in path.parent.iterdir() if p.name.startswith("outputs.sqlite3.corrupt-")]
    assert len(aside) == 1
    errors_ = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors_) == 1 and str(path) in errors_[0].getMessage() and str(aside[0]) in errors_[0].getMessage()
    assert "malformed" in errors_[0].getMessage()


def test_a_file_that_is_not_a_database_is_quarantined_at_open(tmp_path):
    path = tmp_path / "log" / "outputs.sqlite3"
    path.parent.mkdir()
    path.write_bytes(b"not a database" * 100)

    async def body():
        log = FileLog(LogConfig(data_dir=str(tmp_path)))
        await log.append([item("t", [1, 2], 1)])
        entries, _ = await read_all(log, ["t"])
        await log.close()
        return [e.tokens.tolist() for e in entries]

    assert run(body()) == [[1, 2]]
    aside = [p for p in path.parent.iterdir() if p.name.startswith("outputs.sqlite3.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"not a database" * 100


def test_redis_wait_for_replicas_fails_the_append_when_too_few_acknowledge(redis_server):
    async def body():
        log = RedisLog(LogConfig(redis_url=redis_server.url, wait_replicas=1, wait_ms=20))
        try:
            with pytest.raises(LogUnavailable, match="must reach 1 replicas within 20 ms, got 0"):
                await log.append([item("w", [1, 2], 1)])
        finally:
            await log.close()

    run(body())


def test_durable_settings_reach_the_log_config():
    from retriever.service.settings import RetrieverSettings

    s = RetrieverSettings.from_env({"SPECDRAFT_DURABLE_END_SESSION": "1", "SPECDRAFT_REDIS_WAIT_REPLICAS": "2",
                                    "SPECDRAFT_REDIS_WAIT_MS": "50"})
    c = s.log_config()
    assert (s.durable_end_session, c.durable, c.wait_replicas, c.wait_ms) == (True, True, 2, 50)
    assert RetrieverSettings().durable_end_session is False and RetrieverSettings().redis_wait_replicas == 0
    with pytest.raises(ValueError, match="SPECDRAFT_REDIS_WAIT_MS must be an integer number of milliseconds >= 1"):
        RetrieverSettings.from_env({"SPECDRAFT_REDIS_WAIT_MS": "0"})


def test_wait_published_returns_once_appended_and_times_out_while_the_store_is_down(tmp_path):
    from retriever.outputlog.contract import PublishQueue

    async def body():
        log = FileLog(LogConfig(data_dir=str(tmp_path)))
        queue = PublishQueue(log, LogConfig(data_dir=str(tmp_path), backoff_max_s=0.05), "o")
        task = asyncio.create_task(queue.run())
        queue.put("t", np.array([1, 2], np.int32))
        await queue.wait_published(queue.last_seq, 5.0)
        assert [e.tokens.tolist() for e in (await read_all(log, ["t"]))[0]] == [[1, 2]]
        await log.close()  # the store is gone: appends fail, the wait times out, the output stays queued
        queue.put("t", np.array([3], np.int32))
        with pytest.raises(LogUnavailable, match="must append the output within 0.2 s, got .*stays queued"):
            await queue.wait_published(queue.last_seq, 0.2)
        assert queue.health().queued == 1
        task.cancel()

    run(body())


def test_two_processes_sharing_a_corrupt_log_quarantine_it_once_and_share_the_fresh_one(tmp_path):
    path = _corrupt_log(tmp_path, 400)

    async def body():
        a, b = FileLog(LogConfig(data_dir=str(tmp_path))), FileLog(LogConfig(data_dir=str(tmp_path)))
        kept = (await read_all(a, ["t0", "t1", "t2"]))[0]  # a quarantines
        seen = (await read_all(b, ["t0", "t1", "t2"]))[0]  # b fails on the old file, finds the fresh one
        await b.append([item("t0", [5, 5], 1, origin="b")])
        from_a = (await read_all(a, ["t0"]))[0]
        await a.close()
        await b.close()
        return kept, seen, from_a

    kept, seen, from_a = run(body())
    assert [e.entry_id for e in seen] == [e.entry_id for e in kept] and len(kept) >= 300
    assert from_a[-1].tokens.tolist() == [5, 5]
    aside = [p for p in path.parent.iterdir() if p.name.startswith("outputs.sqlite3.corrupt-")]
    assert len([p for p in aside if not p.name.endswith(("-wal", "-shm"))]) == 1
