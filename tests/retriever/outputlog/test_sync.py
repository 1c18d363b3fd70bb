"""`LogSync` end to end: replicas sharing a log, restarts, Redis outages, tenant isolation."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import numpy as np
import pytest
import redis

from retriever.drafting.drafter import Drafter
from retriever.drafting.types import DrafterConfig, Source
from retriever.outputlog.contract import LogConfig, PendingOutput, encode_tokens
from retriever.outputlog.file_log import FileLog
from retriever.outputlog.redis_log import RedisLog
from retriever.outputlog.sync import LogSync, open_log
from tests.redis_fixtures import RedisServer, require_redis_server

EMPTY = np.empty(0, np.int32)


def ids(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


class Replica:
    """A Drafter wired to a LogSync, as the server wires them."""

    def __init__(self, config: LogConfig, log=None) -> None:
        self.sync = LogSync(log or open_log(config), config)
        self.drafter = Drafter(DrafterConfig(), on_output=self.sync.publish)
        self._sid = 0

    async def start(self, warm_timeout_s: float | None = 5.0) -> "Replica":
        await self.sync.start(self.drafter)
        if warm_timeout_s is not None:
            assert await self.sync.wait_warm(warm_timeout_s)
        return self

    def session(self, tenant: str, prompt: np.ndarray, output: np.ndarray, step: int = 8) -> None:
        """One generation: prompt, output accepted `step` tokens at a time, then EndSession."""
        self._sid += 1
        sid = f"s{self._sid}"
        self.drafter.draft(tenant, sid, prompt, EMPTY, 16)
        for i in range(0, len(output), step):
            self.drafter.draft(tenant, sid, None, output[i:i + step], 16)
        self.drafter.end_session(tenant, sid)

    def tree(self, tenant: str, context: np.ndarray):
        self._sid += 1
        return self.drafter.draft(tenant, f"probe{self._sid}", context, EMPTY, 64).tree

    def proposes(self, tenant: str, context: np.ndarray, token: int) -> bool:
        """True if the draft's first node continues `context` with `token` from the tenant's outputs."""
        tree = self.tree(tenant, context)
        return len(tree) > 0 and int(tree.token_ids[0]) == token and int(tree.sources[0]) == Source.TENANT


async def until(predicate, timeout_s: float = 3.0, step_s: float = 0.005) -> float:
    """Seconds until `predicate()` held; fails after `timeout_s`."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        await asyncio.sleep(step_s)
    return time.monotonic() - t0


@pytest.fixture(params=["redis", "cluster", "file"])
def log_config(request, tmp_path):
    if request.param in ("redis", "cluster"):
        server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
        return LogConfig(redis_url=server.url, timeout_s=0.2)
    return LogConfig(data_dir=str(tmp_path / "data"))


def test_open_log_picks_the_store(tmp_path):
    assert isinstance(open_log(LogConfig(data_dir=str(tmp_path))), FileLog)
    assert isinstance(open_log(LogConfig(redis_url="redis://127.0.0.1:1/0")), RedisLog)


def test_output_of_replica_a_drafts_on_replica_b_within_1s(log_config):
    output = ids(1000, 60)

    async def body():
        a, b = await Replica(log_config).start(), await Replica(log_config).start()
        assert not b.proposes("t", output[:10], int(output[10]))
        a.session("t", ids(1, 5), output)
        elapsed = await until(lambda: b.proposes("t", output[:10], int(output[10])), timeout_s=1.0)
        await until(lambda: a.sync.health().skipped_own == 1)
        ha, hb = a.sync.health(), b.sync.health()
        assert (hb.applied_entries, hb.applied_tokens, ha.applied_entries) == (1, 60, 0)
        assert a.drafter.stats().tenant_tokens == b.drafter.stats().tenant_tokens == 60  # no duplicate on A
        assert ha.publish.published == 1 and not ha.degraded and not hb.degraded
        await a.sync.stop()
        await b.sync.stop()
        return elapsed

    assert asyncio.run(body()) < 1.0


def test_restarted_replica_replays_once_and_drafts_again(log_config):
    outputs = {"t": [ids(2000, 50), ids(3000, 70)], "u": [ids(4000, 30)]}

    async def first_life():
        a = await Replica(log_config).start()
        for tenant, outs in outputs.items():
            for out in outs:
                a.session(tenant, ids(1, 5), out)
        await a.sync.stop(flush_s=2.0)
        assert a.sync.health().publish.published == 3

    async def second_life():
        a = await Replica(log_config).start()
        h = a.sync.health()
        assert (h.warm, h.warmup_entries, h.warmup_tokens, h.warmup_total_tokens) == (True, 3, 150, 150)
        assert h.warmup_s > 0 and h.tenants == 2
        assert a.proposes("t", outputs["t"][1][:10], 3010)
        assert not a.proposes("u", outputs["t"][1][:10], 3010)
        a.session("t", ids(1, 5), ids(5000, 40))  # published, read back, skipped: no duplicate
        await until(lambda: a.sync.health().skipped_own == 1)
        assert a.drafter.stats().tenant_tokens == 50 + 70 + 30 + 40  # the sum of the distinct outputs
        assert a.sync.health().applied_entries == 3
        await a.sync.stop()

    asyncio.run(first_life())
    asyncio.run(second_life())


@pytest.mark.parametrize("store", ["redis_server", "redis_cluster"])
def test_tenant_b_never_drafts_what_only_tenant_a_produced(request, store):
    config = LogConfig(redis_url=request.getfixturevalue(store).url)
    secret = ids(7000, 80)
    context, only_a = secret[:20], set(secret[20:].tolist())

    async def body():
        a, b = await Replica(config).start(), await Replica(config).start()
        a.session("tenant-a", ids(1, 5), secret)
        await until(lambda: b.sync.health().applied_entries == 1)
        for replica in (a, b):
            assert replica.proposes("tenant-a", context, int(secret[20]))  # the control: A drafts it
            leaked = set(replica.tree("tenant-b", context).token_ids.tolist()) & only_a
            assert leaked == set(), f"tenant-b drafted tenant-a's tokens {sorted(leaked)}"
        await a.sync.stop()
        await b.sync.stop()

    asyncio.run(body())


def test_redis_sigstop_then_sigkill_never_fails_a_draft_and_queued_outputs_arrive(make_redis):
    server = make_redis(persistent=True)  # AOF, fsync always: what was acknowledged survives the kill
    config = LogConfig(redis_url=server.url, timeout_s=0.2, backoff_max_s=0.2)
    outputs = [ids(10_000 + 100 * i, 40) for i in range(60)]
    phases = {15: "stop", 30: "kill", 45: "restart"}

    async def body():
        a, b = await Replica(config).start(), await Replica(config).start()
        slowest = 0.0
        for i, out in enumerate(outputs):
            if phases.get(i) == "stop":
                server.signal(signal.SIGSTOP)
            elif phases.get(i) == "kill":
                server.kill()
            elif phases.get(i) == "restart":
                assert a.sync.health().degraded and a.sync.health().publish.queued > 0
                server.start()
            t0 = time.perf_counter()
            a.session("t", ids(1, 5), out)  # drafts + EndSession: never raises, never waits on Redis
            assert a.proposes("t", out[:10], int(out[10]))
            slowest = max(slowest, time.perf_counter() - t0)
            await asyncio.sleep(0.02)  # the loop runs the log tasks between calls, as in the server
        await until(lambda: a.sync.health().publish.queued == 0, timeout_s=5.0)
        await until(lambda: b.sync.health().applied_entries == len(outputs), timeout_s=5.0)
        assert b.drafter.stats().tenant_tokens == 40 * len(outputs)
        assert all(b.proposes("t", out[:10], int(out[10])) for out in outputs)
        h = a.sync.health()
        assert (h.publish.dropped, h.publish.published) == (0, len(outputs)) and h.publish.errors > 0
        await a.sync.stop()
        await b.sync.stop()
        return slowest

    slowest = asyncio.run(body())
    assert slowest < 0.05, f"a session's calls took {slowest * 1e3:.1f} ms: something waited on Redis"
    stream = redis.Redis.from_url(server.url).xrange("specdraft:{t}:outputs")
    payloads = [fields[b"t"] for _, fields in stream]
    assert sorted(payloads) == sorted(out.astype("<i4").tobytes() for out in outputs)  # each exactly once


def test_queue_drops_oldest_when_full_and_warms_up_once_redis_appears(tmp_path):
    require_redis_server()
    (tmp_path / "r").mkdir()
    server = RedisServer(tmp_path / "r")  # port reserved, not started: Redis is down at boot
    config = LogConfig(redis_url=server.url, timeout_s=0.2, queue_max=3, backoff_max_s=0.1)

    async def body():
        a = Replica(config)
        for i in range(5):
            a.sync.publish("t", ids(100 * i, 10))
        await a.start(warm_timeout_s=None)
        assert not await a.sync.wait_warm(0.3)
        h = a.sync.health()
        assert (h.warm, h.reading, h.degraded, h.publish.queued, h.publish.dropped) == (False, False, True, 3, 2)
        server.start()
        try:
            assert await a.sync.wait_warm(3.0)
            await until(lambda: a.sync.health().publish.published == 3)
            b = await Replica(config).start()
            assert b.drafter.stats().tenant_tokens == 30  # the three newest outputs
            threading.Thread(target=a.sync.publish, args=("t", ids(900, 10))).start()  # from another thread
            await until(lambda: b.sync.health().applied_entries == 4)
            await a.sync.stop()
            await b.sync.stop()
        finally:
            server.kill()

    asyncio.run(body())


def test_a_corrupt_entry_is_skipped_and_publishing_after_stop_never_raises(log_config):
    async def body():
        a = await Replica(log_config).start()
        writer = open_log(log_config)
        bad = PendingOutput("t", encode_tokens(np.array([5, -7, 9], np.int32)), "other", 1, 0.0)
        good = PendingOutput("t", encode_tokens(ids(6000, 30)), "other", 2, 0.0)
        await writer.append([bad, good])
        await writer.close()
        await until(lambda: a.sync.health().applied_entries == 1)
        assert a.sync.health().rejected == 1 and a.proposes("t", ids(6000, 10), 6010)
        await a.sync.stop()
        return a

    a = asyncio.run(body())
    a.session("t", ids(1, 5), ids(8000, 20))  # the loop is gone: queued, no error reaches the drafter
    assert a.sync.health().publish.queued == 1


def test_cluster_master_stopped_then_killed_never_fails_a_draft_and_its_replica_takes_over(redis_cluster):
    config = LogConfig(redis_url=redis_cluster.url, timeout_s=0.2, backoff_max_s=0.2, wait_replicas=1, wait_ms=500)
    master = redis_cluster.master_of("specdraft:{t}:outputs")
    outputs = [ids(20_000 + 100 * i, 40) for i in range(45)]

    async def body():
        a, b = await Replica(config).start(), await Replica(config).start()
        slowest = 0.0
        for i, out in enumerate(outputs):
            if i == 15:
                master.signal(signal.SIGSTOP)
            elif i == 30:
                master.kill()  # its replica is promoted about two node timeouts after it stopped answering
            t0 = time.perf_counter()
            a.session("t", ids(1, 5), out)
            assert a.proposes("t", out[:10], int(out[10]))
            slowest = max(slowest, time.perf_counter() - t0)
            await asyncio.sleep(0.02)
        await until(lambda: redis_cluster.master_of("specdraft:{t}:outputs") not in (None, master), timeout_s=10.0)
        await until(lambda: b.sync.health().applied_entries >= 15, timeout_s=5.0)  # drafting went on meanwhile
        # the promoted master has no replica: with WAIT 1 its appends fail (outputs stay queued) ...
        await until(lambda: "must reach 1 replicas" in a.sync.health().publish.last_error, timeout_s=5.0)
        assert a.sync.health().publish.queued > 0
        master.start()  # ... until the old master rejoins, as its replica
        await until(lambda: a.sync.health().publish.queued == 0, timeout_s=20.0)
        await until(lambda: b.sync.health().applied_entries == len(outputs), timeout_s=5.0)
        assert all(b.proposes("t", out[:10], int(out[10])) for out in outputs)
        assert a.sync.health().publish.errors > 0 and a.sync.health().publish.dropped == 0
        await a.sync.stop()
        await b.sync.stop()
        return slowest

    try:
        slowest = asyncio.run(body())
        assert redis_cluster.master_of("specdraft:{t}:outputs") is not master
        client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.masters()[0].port)
        payloads = [fields[b"t"] for _, fields in client.xrange("specdraft:{t}:outputs")]
        client.close()
    finally:
        if master.proc is None or master.proc.poll() is not None:
            master.start()
        redis_cluster.wait_ok()
    assert slowest < 0.05, f"a session's calls took {slowest * 1e3:.1f} ms: something waited on Redis"
    assert sorted(payloads) == sorted(out.astype("<i4").tobytes() for out in outputs)  # each exactly once


@pytest.mark.parametrize("budget", [2_000_000, 5_000])
def test_a_replayed_index_drafts_exactly_as_one_built_entry_by_entry(log_config, budget):
    """The replay (chunks of a tenant's entries in one insert call each) equals add_prior_output of each
    entry in log order, own entries skipped and a corrupt one rejected, with and without evictions."""
    rng = np.random.default_rng(budget)
    entries = []
    for tenant in ("t0", "t1", "t2"):
        for i in range(rng.integers(5, 40)):
            origin = "me" if rng.random() < 0.1 and i != 3 else "other"
            tokens = rng.integers(0, 6 if tenant == "t0" else 50_000, rng.integers(1, 900)).astype(np.int32)
            if tenant == "t1" and i == 3:
                tokens[rng.integers(0, len(tokens))] = -7  # corrupt
            entries.append(PendingOutput(tenant, encode_tokens(tokens), origin, 0, 0.0))
    rng.shuffle(entries)  # tenants interleaved in the log; each origin's seqs increasing (else: duplicates)
    entries = [PendingOutput(e.tenant, e.payload, e.origin, seq, 0.0) for seq, e in enumerate(entries, 1)]
    config = DrafterConfig(tenant_token_budget=budget)

    async def body():
        writer = open_log(log_config)
        await writer.append(entries)
        await writer.close()
        sync = LogSync(open_log(log_config), log_config, replica_id="me")
        replayed = Drafter(config)
        await sync.start(replayed)
        assert await sync.wait_warm(10.0)
        await sync.stop()
        return replayed, sync.health()

    replayed, health = asyncio.run(body())
    built = Drafter(config)
    for entry in sorted(entries, key=lambda e: ["t0", "t1", "t2"].index(e.tenant)):  # stable: log order per tenant
        if entry.origin != "me":
            try:
                built.add_prior_output(entry.tenant, np.frombuffer(entry.payload, "<i4").astype(np.int32))
            except ValueError:
                pass
    assert health.rejected == 1 and health.skipped_own == sum(e.origin == "me" for e in entries)
    drafted = 0
    for i in range(60):
        entry = entries[int(rng.integers(0, len(entries)))]
        tokens = np.frombuffer(entry.payload, "<i4").astype(np.int32)
        end = int(rng.integers(1, len(tokens) + 1))
        context = np.clip(tokens[max(0, end - 12):end], 0, None)
        want, got = (d.draft(entry.tenant, f"p{i}", context, EMPTY, 64).tree for d in (built, replayed))
        assert got.token_ids.tolist() == want.token_ids.tolist() and got.parents.tolist() == want.parents.tolist()
        np.testing.assert_array_equal(got.scores, want.scores)
        drafted += len(got) > 0
    assert drafted > 30
