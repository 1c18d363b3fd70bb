"""`specdraft bench abuse` (retriever part, issue 18 items 1-2): a hostile client on loopback
against a real `specdraft retriever serve` process.

1. Session flood: `flood_sessions` clients open sessions with `prompt_tokens`-token prompts (never
   ended) from a few tenants until `sessions` were tried; the server's session memory budget is
   `budget_mib`. Reported: the server's peak RSS (VmHWM) and its growth over the idle RSS vs the
   budget (must stay within it, +10%), sessions accepted and refused (RESOURCE_EXHAUSTED).
   Before it, `tenants` one-call tenants (Draft + EndSession, no output): the RSS growth they leave.
2. Idle streams: `streams` DraftStreams held idle (one request each) by another process; health
   (`grpc.health.v1.Health/Check`) and a fresh client's Draft latency while they are held vs
   unloaded, in alternating rounds (must all succeed, p99 within 2x unloaded).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

PROBE_CALLS = 400  # health checks and Drafts per latency measurement
PROBE_PROMPT = list(range(100, 164))  # [64] token ids of the fresh client's Draft


@dataclass
class FloodResult:
    budget_mib: float
    sessions_tried: int
    prompt_tokens: int
    accepted: int
    refused: int
    other_errors: int
    idle_rss_mib: float
    peak_rss_mib: float  # VmHWM
    seconds: float
    tenants: int
    tenant_rss_growth_mib: float  # RSS after the one-call tenants minus before

    @property
    def growth_mib(self) -> float:
        return self.peak_rss_mib - self.idle_rss_mib

    @property
    def within_budget(self) -> bool:
        return self.growth_mib <= 1.1 * self.budget_mib


@dataclass
class StreamsResult:
    streams: int
    held: int
    health_ok: int
    health_failed: int
    draft_ok: int
    draft_failed: int
    unloaded_health_p99_us: float
    unloaded_draft_p99_us: float
    held_health_p99_us: float
    held_draft_p99_us: float

    @property
    def ok(self) -> bool:
        return (self.held == self.streams and not self.health_failed and not self.draft_failed
                and self.held_health_p99_us <= 2 * self.unloaded_health_p99_us
                and self.held_draft_p99_us <= 2 * self.unloaded_draft_p99_us)


@dataclass
class AbuseResult:
    flood: FloodResult
    streams: StreamsResult

    def table(self) -> str:
        f, s = self.flood, self.streams
        rows = [
            (f"session flood: {f.sessions_tried} sessions x {f.prompt_tokens} tokens in {f.seconds:.1f} s",
             f"{f.accepted} accepted, {f.refused} RESOURCE_EXHAUSTED, {f.other_errors} other"),
            ("server RSS idle / peak (MiB)", f"{f.idle_rss_mib:.0f} / {f.peak_rss_mib:.0f}"),
            ("peak growth vs session budget (MiB)", f"{f.growth_mib:.0f} vs {f.budget_mib:.0f} "
                                                     f"({'within' if f.within_budget else 'OVER'} +10%)"),
            (f"{f.tenants} one-call tenants: RSS growth (MiB)", f"{f.tenant_rss_growth_mib:.1f}"),
            ("idle DraftStreams held", f"{s.held} of {s.streams}"),
            ("health checks while held: ok / failed", f"{s.health_ok} / {s.health_failed}"),
            ("fresh client's Drafts while held: ok / failed", f"{s.draft_ok} / {s.draft_failed}"),
            ("health p99 unloaded / held (us)", f"{s.unloaded_health_p99_us:.0f} / {s.held_health_p99_us:.0f}"),
            ("Draft p99 unloaded / held (us)", f"{s.unloaded_draft_p99_us:.0f} / {s.held_draft_p99_us:.0f}"),
            ("streams verdict (all ok, p99 within 2x)", "PASS" if s.ok else "FAIL"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _peak_rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of the process, MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _flood(target: str, sessions: int, prompt_tokens: int, clients: int) -> tuple[int, int, int]:
    """(accepted, refused, other): `sessions` Drafts with fresh prompts over `clients` channels."""
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 50_000, prompt_tokens, dtype=np.int32).tolist() for _ in range(16)]

    def client(c: int) -> tuple[int, int, int]:
        counts = [0, 0, 0]
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RetrieverStub(channel)
            for i in range(c, sessions, clients):
                try:
                    stub.Draft(pb.DraftRequest(tenant=f"flood{i % 8}", session_id=f"s{i}", prompt=prompts[i % 16],
                                               max_nodes=8), timeout=30)
                    counts[0] += 1
                except grpc.RpcError as e:
                    counts[1 if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else 2] += 1
        return counts[0], counts[1], counts[2]

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return tuple(sum(r[k] for r in results) for k in range(3))  # type: ignore[return-value]


def _one_call_tenants(target: str, tenants: int) -> None:
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for i in range(tenants):
            stub.Draft(pb.DraftRequest(tenant=f"once{i}", session_id="s", prompt=PROBE_PROMPT), timeout=30)
            stub.EndSession(pb.EndSessionRequest(tenant=f"once{i}", session_id="s"), timeout=30)


def run_flood(budget_mib: float, sessions: int, prompt_tokens: int, tenants: int, clients: int = 4) -> FloodResult:
    from specdraft.bench.server import ServerProcess

    env = {"SPECDRAFT_SESSION_MEMORY_BYTES": str(int(budget_mib * 2**20)),
           "SPECDRAFT_TENANT_MAX_SESSIONS": str(sessions), "SPECDRAFT_TENANT_MAX_TOKENS": str(1 << 40),
           "SPECDRAFT_MAX_CONTEXT_TOKENS": str(max(prompt_tokens, 1024))}
    with ServerProcess(env) as server:
        before, _ = _peak_rss_mib(server.proc.pid)
        _one_call_tenants(server.target, tenants)
        after, _ = _peak_rss_mib(server.proc.pid)
        idle_rss, _ = _peak_rss_mib(server.proc.pid)
        t0 = time.perf_counter()
        accepted, refused, other = _flood(server.target, sessions, prompt_tokens, clients)
        seconds = time.perf_counter() - t0
        _, peak = _peak_rss_mib(server.proc.pid)
    return FloodResult(budget_mib, sessions, prompt_tokens, accepted, refused, other, idle_rss, peak, seconds,
                       tenants, after - before)


def _p99_us(samples_ns: list[int]) -> float:
    return float(np.percentile(np.array(samples_ns, np.float64), 99)) / 1e3 if samples_ns else float("nan")


def _probe(target: str) -> tuple[list[int], int, list[int], int]:
    """A fresh client: PROBE_CALLS health checks and Drafts; (health ns, health failures, Draft ns, Draft failures)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    health_ns, draft_ns, health_failed, draft_failed = [], [], 0, 0
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.RetrieverStub(channel)
        for i in range(PROBE_CALLS + 20):  # the first 20: warm-up
            t0 = time.perf_counter_ns()
            try:
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if i >= 20:
                    health_ns.append(time.perf_counter_ns() - t0)
            except grpc.RpcError:
                health_failed += 1
            t0 = time.perf_counter_ns()
            try:
                stub.Draft(pb.DraftRequest(tenant="probe", session_id="p", prompt=PROBE_PROMPT, max_nodes=8), timeout=5)
                if i >= 20:
                    draft_ns.append(time.perf_counter_ns() - t0)
            except grpc.RpcError:
                draft_failed += 1
    return health_ns, health_failed, draft_ns, draft_failed


async def _hold_streams(target: str, n: int, conn) -> None:
    """Opens n DraftStreams (100 per channel), one request each, sends how many were held on `conn`,
    then holds them idle until `conn` receives anything."""
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(target) for _ in range((n + 99) // 100)]
    calls, held = [], 0
    try:
        for i in range(n):
            call = pb_grpc.RetrieverStub(channels[i // 100]).DraftStream()
            calls.append(call)
            try:
                await call.write(pb.DraftRequest(tenant="idle", session_id=f"i{i}", prompt=PROBE_PROMPT, max_nodes=8))
                await call.read()
                held += 1
            except grpc.RpcError:
                pass
        conn.send(held)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


def _holder(target: str, n: int, conn) -> None:  # a process of its own: no client-side cost in the probe
    asyncio.run(_hold_streams(target, n, conn))


def run_streams(streams: int, rounds: int = 3) -> StreamsResult:
    """`rounds` times: a fresh client's probe unloaded, then while another process holds `streams` idle
    DraftStreams; the p99s pool each kind's samples over the rounds (host noise hits both alike)."""
    import multiprocessing

    from specdraft.bench.server import ServerProcess

    env = {"SPECDRAFT_MAX_STREAMS_PER_PEER": str(streams), "SPECDRAFT_MAX_STREAMS": str(streams),
           "SPECDRAFT_STREAM_IDLE_S": "600"}
    unloaded: tuple[list[int], int, list[int], int] = ([], 0, [], 0)
    loaded: tuple[list[int], int, list[int], int] = ([], 0, [], 0)
    held = streams
    ctx = multiprocessing.get_context("spawn")
    with ServerProcess(env) as server:
        for _ in range(rounds):
            unloaded = _merge(unloaded, _probe(server.target))
            ours, theirs = ctx.Pipe()
            holder = ctx.Process(target=_holder, args=(server.target, streams, theirs), daemon=True)
            holder.start()
            try:
                held = min(held, ours.recv() if ours.poll(300) else 0)
                loaded = _merge(loaded, _probe(server.target))
            finally:
                ours.send(None)
                holder.join(60)
                if holder.is_alive():
                    holder.kill()
    return StreamsResult(streams, held, len(loaded[0]), loaded[1], len(loaded[2]), loaded[3],
                         _p99_us(unloaded[0]), _p99_us(unloaded[2]), _p99_us(loaded[0]), _p99_us(loaded[2]))


def _merge(a: tuple, b: tuple) -> tuple:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


def run_abuse(budget_mib: float = 256.0, sessions: int = 4000, prompt_tokens: int = 2000, tenants: int = 5000,
              streams: int = 1300) -> AbuseResult:
    """Both parts, each against a server process of its own on 127.0.0.1."""
    return AbuseResult(run_flood(budget_mib, sessions, prompt_tokens, tenants), run_streams(streams))
