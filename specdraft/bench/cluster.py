"""`specdraft bench cluster`: tenants sharded over retriever replicas on a local Redis Cluster.

Three phases, each on a fresh local Redis Cluster (3 masters + 3 replicas, `RedisClusterProcs`):
1. memory: `tenants` x `tokens` of outputs in the log; one retriever process, then `replicas`
   processes (R = `owners`) started together; each one's online index bytes and RSS once warm.
2. replica kill -9: a client (seeds: every replica) runs sessions over random tenants while one
   replica is killed; sessions failed after the client's re-send (no draft although no deadline
   passed: every owner refused or answered empty; or EndSession not acknowledged), drafts that
   missed the 0.5 s deadline (counted apart: the client decodes that step plainly, the session goes
   on), and the time until the survivors list each other only and serve every tenant again.
3. Redis master kill -9: one retriever with durable EndSession runs sessions while the master of
   their tenants' slots is killed; acknowledged outputs missing after the promotion, without and
   with `SPECDRAFT_REDIS_WAIT_REPLICAS=1` (WAIT for one replica after each append batch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from specdraft.bench.redis_proc import RedisClusterProcs
from specdraft.bench.server import ServerProcess

VOCAB = 50_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenants", type=int, default=1000, help="tenants (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=20_000, help="output tokens per tenant (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=3, help="retriever processes (default: %(default)s)")
    p.add_argument("--owners", type=int, default=2, help="replicas owning each tenant, R (default: %(default)s)")
    p.add_argument("--output-tokens", type=int, default=500, help="tokens per output (default: %(default)s)")
    p.add_argument("--kill-s", type=float, default=8.0, help="seconds of sessions around each kill")
    p.add_argument("--membership-ttl-s", type=float, help="SPECDRAFT_MEMBERSHIP_TTL_S of the retrievers "
                   "(default: the settings' default)")
    p.add_argument("--heartbeat-s", type=float, help="SPECDRAFT_HEARTBEAT_S of the retrievers (default: the settings')")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--outputs-from", metavar="JSONL", help="draw each tenant's outputs from the output_ids of "
                   "these traces (real model outputs, e.g. /work/shared/traces/dev.jsonl) instead of random tokens")
    p.add_argument("--log-dir", metavar="DIR", help="keep each retriever's log there (replica-N.log)")


@dataclass(frozen=True)
class ClusterBench:
    tenants: int
    tokens_per_tenant: int
    outputs: str  # "random" tokens, or the traces file the outputs were drawn from
    single_tokens: int  # tokens the single replica indexed (all tenants)
    replicas: int
    owners: int
    single_index_mb: float
    single_rss_mb: float
    replica_index_mb: tuple[float, ...]
    replica_rss_mb: tuple[float, ...]
    kill_sessions: int
    kill_failed_sessions: int
    kill_failed_before: int  # of them, before the kill (drafts past the 0.5 s deadline under load)
    kill_failed_no_draft: int  # of them, no draft (the rest: EndSession not acknowledged)
    kill_rerouted_sessions: int
    members_back_s: float  # kill -9 -> the survivors list only each other
    owners_back_s: float  # kill -9 -> every tenant drafts on both survivors
    kill_late_drafts: int  # sessions whose draft missed the 0.5 s deadline (no draft that step; not failed)
    kill_late_before: int  # of them, before the kill
    master_kill: tuple[dict, ...]  # per wait_replicas setting: acked, missing, promotion_s, sessions, failed
    load_average: tuple[float, ...]


Pool = tuple[np.ndarray, ...]  # real outputs (int32 token ids) to draw tenants' outputs from


def load_pool(path: str) -> Pool:
    """The `output_ids` of a traces JSONL (e.g. /work/shared/traces/dev.jsonl) of at least 40 tokens."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pool = tuple(np.asarray(r["output_ids"], np.int32) for r in rows if len(r.get("output_ids", ())) >= 40)
    if not pool:
        raise ValueError(f"--outputs-from must name a JSONL with output_ids of >= 40 tokens, got none in {path}")
    return pool


def _outputs(tenant_index: int, n: int, size: int, pool: Pool = ()) -> list[np.ndarray]:
    """The tenant's outputs: `n // size` of `size` random tokens, or real outputs drawn from `pool`
    (seeded by the tenant) until they hold `n` tokens."""
    rng = np.random.default_rng(tenant_index)
    if not pool:
        return [rng.integers(0, VOCAB, size, dtype=np.int32) for _ in range(max(1, n // size))]
    outs, total = [], 0
    while total < n:
        outs.append(pool[int(rng.integers(len(pool)))])
        total += outs[-1].shape[0]
    return outs


async def _fill(url: str, tenants: int, tokens: int, size: int, pool: Pool = ()) -> None:
    from retriever.outputlog.contract import LogConfig, PendingOutput, encode_tokens
    from retriever.outputlog.redis_log import RedisLog

    log = RedisLog(LogConfig(redis_url=url, token_budget=tokens, timeout_s=5.0))
    seq, batch = 0, []
    for t in range(tenants):
        for out in _outputs(t, tokens, size, pool):
            seq += 1
            batch.append(PendingOutput(f"tenant-{t}", encode_tokens(out), "bench", seq, 0.0))
            if len(batch) == 256:
                await log.append(batch)
                batch = []
    if batch:
        await log.append(batch)
    await log.close()


def _metric(proc: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return float(re.search(rf"^specdraft_retriever_{name} (\S+)$", text, re.M).group(1))


def _env(url: str, args: argparse.Namespace, **extra: str) -> dict[str, str]:
    return {"SPECDRAFT_REDIS_URL": url, "SPECDRAFT_TENANT_TOKEN_BUDGET": str(max(args.tokens, 1000)),
            "SPECDRAFT_TENANT_OWNERS": str(args.owners), "SPECDRAFT_MAX_TENANTS": str(args.tenants + 100),
            "SPECDRAFT_MAX_QUEUE_WAIT_MS": "0",  # a loaded 2-core box: no queue-wait refusals
            **({"SPECDRAFT_MEMBERSHIP_TTL_S": str(args.membership_ttl_s)} if args.membership_ttl_s else {}),
            **({"SPECDRAFT_HEARTBEAT_S": str(args.heartbeat_s)} if args.heartbeat_s else {}), **extra}


def _log_path(args: argparse.Namespace, name: str) -> str | None:
    if not getattr(args, "log_dir", None):
        return None
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(args.log_dir) / f"{name}.log")


def _start_many(env: dict[str, str], n: int, args: argparse.Namespace) -> list[ServerProcess]:
    procs: list[ServerProcess] = []
    threads = [threading.Thread(target=lambda i=i: procs.append(ServerProcess(
        env, args=(), start_timeout_s=1800, log_path=_log_path(args, f"replica-{i}")))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return procs


def _settle(procs: list[ServerProcess], timeout_s: float = 600.0) -> None:
    """Waits until each replica's indexed tokens stop changing (the drops after the others joined)."""
    last, stable_since, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = tuple(_metric(p, "tenant_tokens") for p in procs)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 3.0:
            return
        time.sleep(0.5)


def _memory(url: str, args: argparse.Namespace
            ) -> tuple[tuple[float, float, list[float], list[float], int], list[ServerProcess]]:
    """(single replica's index MB and RSS, each replica's index MB and RSS, the single replica's indexed
    tokens), the replicas (left running)."""
    with ServerProcess(_env(url, args), args=(), start_timeout_s=1800, log_path=_log_path(args, "single")) as single:
        single_index, single_rss = _metric(single, "online_index_bytes") / 2**20, single.rss_mb()
        single_tokens = int(_metric(single, "tenant_tokens"))
    time.sleep(3.5)  # its membership entry is gone (left at stop; TTL otherwise)
    procs = _start_many(_env(url, args), args.replicas, args)
    _settle(procs)
    return (single_index, single_rss, [_metric(p, "online_index_bytes") / 2**20 for p in procs],
            [p.rss_mb() for p in procs], single_tokens), procs


class _Sessions(threading.Thread):
    """Sessions over random tenants until stopped: the prompt is a slice of the tenant's newest output,
    so a working owner drafts the next token; counts sessions and failures."""

    def __init__(self, targets: str, tenants: int, tokens: int, size: int, pool: Pool = ()) -> None:
        super().__init__(daemon=True)
        from retriever.client import RetrieverClient

        self.client = RetrieverClient(targets, deadline_s=0.5, call_timeout_s=3.0, backoff_s=(0.02, 0.5))
        self.tenants, self.tokens, self.size, self.pool = tenants, tokens, size, pool
        self.sessions = self.failed = self.rerouted = self.no_draft = 0
        self.failed_at: list[float] = []  # monotonic time of each failed session
        self.late_at: list[float] = []  # ... of each session whose draft missed the 0.5 s deadline
        self.acked: list[tuple[str, bytes]] = []  # (tenant, output payload) of acknowledged EndSessions
        self.stop_event, self.rng = threading.Event(), random.Random(0)

    def run(self) -> None:
        while not self.stop_event.is_set():
            t = self.rng.randrange(self.tenants)
            out = _outputs(t, self.tokens, self.size, self.pool)[-1]  # the newest: never trimmed
            s = self.client.session(f"tenant-{t}")
            s.start(out[:20].tolist())
            tree = s.draft([int(out[20])], 8)
            fresh = [self.rng.randrange(VOCAB) for _ in range(16)]
            s.end(fresh)
            ok = s.closed.wait(10) and s.output_tokens is not None
            self.sessions += 1
            self.rerouted += s.reroutes > 0
            late = tree is None and s.timeouts > 0  # the draft missed its deadline: plain decoding, not a failure
            if late:
                self.late_at.append(time.monotonic())
            if (tree is None and not late) or not ok:
                self.failed += 1
                self.no_draft += tree is None
                self.failed_at.append(time.monotonic())
            if ok:
                self.acked.append((f"tenant-{t}", np.asarray([int(out[20]), *fresh], np.int32).tobytes()))

    def finish(self) -> None:
        self.stop_event.set()
        self.join(30)
        self.client.close()


def _replica_kill(procs: list[ServerProcess], args: argparse.Namespace, pool: Pool) -> tuple[int, ...]:
    from retriever.client import RetrieverClient

    load = _Sessions(",".join(p.target for p in procs), args.tenants, args.tokens, args.output_tokens, pool)
    load.start()
    time.sleep(args.kill_s / 2)
    victim, survivors = procs[0], procs[1:]
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    print(f"replica kill -9 at {time.strftime('%H:%M:%S', time.gmtime())}: pid {victim.proc.pid} "
          f"(log {victim.log_path})", flush=True)
    probes = [RetrieverClient(p.target, deadline_s=2.0, call_timeout_s=2.0) for p in survivors]
    members_back = owners_back = float("nan")
    pending = {(i, t) for i in range(len(probes)) for t in range(args.tenants)}
    while time.monotonic() - killed < 120:
        if members_back != members_back and all(len(c.describe().members) == len(survivors) for c in probes):
            members_back = time.monotonic() - killed
        if members_back == members_back:
            pending = _unserved(probes, pending)
            if not pending:
                owners_back = time.monotonic() - killed
                break
        time.sleep(0.1)
    time.sleep(max(0.0, args.kill_s / 2 - (time.monotonic() - killed)))
    load.finish()
    for c in probes:
        c.close()
    before = sum(t < killed for t in load.failed_at)
    late = (len(load.late_at), sum(t < killed for t in load.late_at))
    return load.sessions, load.failed, before, load.no_draft, load.rerouted, members_back, owners_back, late


def _unserved(probes: list, pending: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (survivor, tenant) pairs of `pending` that still refuse (not an owner yet, or warming up):
    each survivor owns every tenant once the dead replica is out (R = 2 of 2). One DraftBatch of up to
    200 probes per call, straight to the survivor (no client re-send)."""
    from protos.specdraft.v1 import retriever_pb2 as pb

    left = set()
    for i, c in enumerate(probes):
        tenants = sorted(t for j, t in pending if j == i)
        stub = c.targets.stub(c.target)
        for k in range(0, len(tenants), 200):
            chunk = tenants[k:k + 200]
            request = pb.DraftBatchRequest(requests=[pb.DraftRequest(tenant=f"tenant-{t}", session_id=f"probe-{t}",
                                                                     prompt=[1, 2, 3], max_nodes=1) for t in chunk])
            try:
                reply = stub.DraftBatch(request, timeout=5.0)
            except Exception:  # noqa: BLE001 - the survivor is busy: probe again
                left |= {(i, t) for t in chunk}
                continue
            left |= {(i, t) for t, r in zip(chunk, reply.responses) if r.HasField("error") and r.error.code}
    return left


def _master_kill(workdir: Path, args: argparse.Namespace, wait_replicas: int, pool: Pool) -> dict:
    """One retriever (durable EndSession) under sessions while a Redis master is killed -9."""
    import redis

    cluster = RedisClusterProcs(workdir / f"redis-wait{wait_replicas}").start()
    tenants, tokens = 30, 2000
    try:
        asyncio.run(_fill(cluster.url, tenants, tokens, args.output_tokens, pool))
        env = _env(cluster.url, args, SPECDRAFT_DURABLE_END_SESSION="1", SPECDRAFT_DURABLE_TIMEOUT_S="2",
                   SPECDRAFT_REDIS_WAIT_REPLICAS=str(wait_replicas), SPECDRAFT_REDIS_WAIT_MS="500")
        with ServerProcess(env, args=(), start_timeout_s=300, log_path=_log_path(args, f"master-kill-{wait_replicas}")
                           ) as proc:
            load = _Sessions(proc.target, tenants, tokens, args.output_tokens, pool)
            load.start()
            time.sleep(args.kill_s / 2)
            victim = cluster.master_of("specdraft:{tenant-0}:outputs")
            acked_before = len(load.acked)
            victim.kill()
            killed = time.monotonic()
            key = "specdraft:{tenant-0}:outputs"
            while cluster.master_of(key) in (None, victim) and time.monotonic() - killed < 60:
                time.sleep(0.05)
            promotion_s = time.monotonic() - killed
            time.sleep(args.kill_s / 2)
            load.finish()
        client = redis.RedisCluster(host="127.0.0.1", port=cluster.masters()[0].port)
        stored: dict[str, set[bytes]] = {}
        for tenant, payload in load.acked:
            if tenant not in stored:
                stored[tenant] = {f[b"t"] for _, f in client.xrange(f"specdraft:{{{tenant}}}:outputs")}
        missing = sum(payload not in stored[tenant] for tenant, payload in load.acked)
        client.close()
        return {"wait_replicas": wait_replicas, "sessions": load.sessions, "failed": load.failed,
                "late": len(load.late_at),
                "acked": len(load.acked), "acked_before_kill": acked_before, "missing": missing,
                "promotion_s": round(promotion_s, 2)}
    finally:
        cluster.kill_all()


def bench_cluster(args: argparse.Namespace) -> ClusterBench:
    pool = load_pool(args.outputs_from) if args.outputs_from else ()
    with tempfile.TemporaryDirectory(prefix="specdraft-cluster-") as tmp:
        workdir = Path(tmp)
        cluster = RedisClusterProcs(workdir / "redis").start()
        procs: list[ServerProcess] = []
        try:
            t0 = time.monotonic()
            asyncio.run(_fill(cluster.url, args.tenants, args.tokens, args.output_tokens, pool))
            print(f"filled the log: {args.tenants} tenants x {args.tokens} tokens in {time.monotonic() - t0:.1f} s",
                  flush=True)
            (single_index, single_rss, index_mb, rss_mb, single_tokens), procs = _memory(cluster.url, args)
            print(f"memory: single {single_index:.1f} MB, replicas {[round(x, 1) for x in index_mb]} MB", flush=True)
            sessions, failed, before, no_draft, rerouted, members_back, owners_back, late = _replica_kill(
                procs, args, pool)
            print(f"replica kill -9: {sessions} sessions, {failed} failed ({no_draft} without a draft), "
                  f"{late[0]} drafts late; members back in {members_back:.2f} s, 2 owners in {owners_back:.2f} s",
                  flush=True)
        finally:
            for p in procs:
                p.stop(10)
            cluster.kill_all()
        master_kill = tuple(_master_kill(workdir, args, w, pool) for w in (0, 1))
    return ClusterBench(args.tenants, args.tokens, args.outputs_from or "random", single_tokens,
                        args.replicas, args.owners, round(single_index, 1),
                        round(single_rss, 1), tuple(round(x, 1) for x in index_mb), tuple(round(x, 1) for x in rss_mb),
                        sessions, failed, before, no_draft, rerouted, round(members_back, 2), round(owners_back, 2),
                        late[0], late[1], master_kill,
                        tuple(round(x, 2) for x in os.getloadavg()))


def table(r: ClusterBench) -> str:
    ideal = r.single_index_mb * r.owners / r.replicas
    per_token = r.single_index_mb * 2**20 / max(1, r.single_tokens)
    lines = [f"scale: {r.tenants} tenants x {r.tokens_per_tenant} tokens ({r.outputs} outputs), {r.replicas} "
             f"replicas, R = {r.owners}",
             f"online index MB: single replica {r.single_index_mb} ({r.single_tokens} tokens, {per_token:.0f} B/token; "
             f"RSS {r.single_rss_mb}); per replica "
             f"{list(r.replica_index_mb)} (RSS {list(r.replica_rss_mb)}); ideal R/n x single = {ideal:.1f}",
             f"replica kill -9: {r.kill_sessions} sessions, {r.kill_failed_sessions} failed after re-send "
             f"({r.kill_failed_before} before the kill; {r.kill_failed_no_draft} without a draft, "
             f"the rest at EndSession), "
             f"{r.kill_rerouted_sessions} re-sent, {r.kill_late_drafts} drafts past the 0.5 s deadline "
             f"({r.kill_late_before} before the kill); members back in {r.members_back_s} s, every tenant on 2 owners "
             f"in {r.owners_back_s} s"]
    for m in r.master_kill:
        lines.append(f"redis master kill -9 (wait_replicas={m['wait_replicas']}): promoted in {m['promotion_s']} s; "
                     f"{m['sessions']} sessions, {m['failed']} failed, {m['late']} drafts late; "
                     f"{m['acked']} EndSession-acked outputs, "
                     f"{m['missing']} missing afterwards")
    lines.append(f"load average: {r.load_average}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = bench_cluster(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0
