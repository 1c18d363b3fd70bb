"""`specdraft bench overload`: the retriever under 10x its concurrency cap, on loopback (issue 6).

The server runs alone in a subprocess (`specdraft retriever serve`, no indexes: drafts from the
session context only, output log off) with `max_inflight=cap`, `max_queued=queued` (so grpc
holds at most cap + queued RPCs) and `max_queue_wait_ms` (see `retriever.service.admission`); the load
comes from other processes (spawned, one grpc.aio channel each), every request stamped with
its send time as `RetrieverClient` does. Phases, each bounded in count and time:
1. unloaded: one sequential caller, `unloaded_calls` Draft calls -> p50/p99;
2. overload (the soak): `10 * cap` closed-loop callers for `seconds` (at most `max_calls`
   calls each); a refused caller backs off, jittered, from `backoff_s` doubling up to
   MAX_BACKOFF_S, reset by an accepted call (a speculative-decoding client decodes those steps
   without a draft) -> sent, OK, RESOURCE_EXHAUSTED (and how long a refusal took),
   other errors, accepted p50/p99 vs unloaded p99, server RSS (/proc/<pid>/status) at start
   and end;
3. cancelled streams: `streams` DraftStreams cancelled after their first answer -> the
   server's session gauge (/metrics) before, right after and once idle expiry (1 s) ran.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from dataclasses import dataclass, field

import numpy as np

from specdraft.bench.server import ServerProcess

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
MAX_BACKOFF_S = 5.0  # a refused caller's backoff doubles up to this (reset by an accepted call)


@dataclass(frozen=True)
class LoadResult:
    """What closed-loop callers saw: latencies (ns) of OK and RESOURCE_EXHAUSTED calls, other codes."""

    ok_ns: list[int] = field(default_factory=list)
    exhausted_ns: list[int] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return len(self.ok_ns) + len(self.exhausted_ns) + sum(self.other.values())

    def merged(self, more: "LoadResult") -> "LoadResult":
        other = dict(self.other)
        for code, n in more.other.items():
            other[code] = other.get(code, 0) + n
        return LoadResult(self.ok_ns + more.ok_ns, self.exhausted_ns + more.exhausted_ns, other)


# ---------------------------------------------------------------- load, in other processes


async def _callers(target: str, callers: int, seconds: float, max_calls: int, backoff_s: float,
                   tag: str) -> LoadResult:
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    result, end = LoadResult(), time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RetrieverStub(channel)

        async def caller(i: int) -> None:
            request = pb.DraftRequest(tenant="o", session_id=f"{tag}-{i}", prompt=PROMPT)
            backoff = backoff_s
            for _ in range(max_calls):
                if time.monotonic() >= end:
                    return
                t0 = time.perf_counter_ns()
                request.sent_unix_us = time.time_ns() // 1000
                try:
                    await stub.Draft(request, timeout=30)
                    result.ok_ns.append(time.perf_counter_ns() - t0)
                    backoff = backoff_s
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        result.exhausted_ns.append(time.perf_counter_ns() - t0)
                    else:
                        result.other[e.code().name] = result.other.get(e.code().name, 0) + 1
                    await asyncio.sleep(backoff * (0.5 + random.random()))  # jittered exponential backoff
                    backoff = min(2 * backoff, MAX_BACKOFF_S)

        await asyncio.gather(*(caller(i) for i in range(callers)))
    return result


def _load_worker(args: tuple, queue: "multiprocessing.Queue[LoadResult]") -> None:
    queue.put(asyncio.run(_callers(*args)))


def run_load(target: str, callers: int, seconds: float, *, processes: int = 2, max_calls: int = 1_000_000,
             backoff_s: float = 0.02) -> LoadResult:
    """`callers` closed-loop Draft callers spread over `processes` spawned processes (see the module doc)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    shares = [callers // processes + (k < callers % processes) for k in range(processes)]
    workers = [ctx.Process(target=_load_worker, args=((target, n, seconds, max_calls, backoff_s, f"p{k}"), queue))
               for k, n in enumerate(shares) if n]
    for w in workers:
        w.start()
    result = LoadResult()
    try:
        for _ in workers:
            result = result.merged(queue.get(timeout=seconds + 120))
    finally:
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.kill()
    return result


async def cancelled_streams(port: int, n: int, concurrency: int = 50) -> int:
    """n DraftStreams to 127.0.0.1:port, each cancelled after its first answer (every 4th before
    sending anything); 3/4 of n sessions are started. Returns how many the server refused."""
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    refused = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)

        async def one(i: int) -> None:
            nonlocal refused
            call = stub.DraftStream(timeout=10)
            try:
                if i % 4:
                    await call.write(pb.DraftRequest(tenant="c", session_id=f"s{i}", prompt=PROMPT))
                    await call.read()
            except grpc.aio.AioRpcError:  # refused at the cap (a failed write reads as INTERNAL)
                refused += 1
            call.cancel()

        for start in range(0, n, concurrency):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + concurrency))))
    return refused


def _cancel_worker(port: int, n: int, concurrency: int, queue: "multiprocessing.Queue[int]") -> None:
    queue.put(asyncio.run(cancelled_streams(port, n, concurrency)))


def run_cancelled(port: int, n: int, concurrency: int = 50) -> int:
    """`cancelled_streams` in a spawned process (the server's loop is alone in its own); how many refused."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_cancel_worker, args=(port, n, concurrency, queue))
    worker.start()
    try:
        return queue.get(timeout=600)
    finally:
        worker.join(5)


# ---------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class OverloadResult:
    cap: int
    queued: int
    callers: int
    backoff_ms: float
    max_queue_wait_ms: float
    unloaded_p50_us: float
    unloaded_p99_us: float
    sent: int
    ok: int
    resource_exhausted: int
    other_errors: int
    exhausted_p50_us: float  # how long a refusal took
    accepted_p50_us: float
    accepted_p99_us: float
    seconds: float
    rss_start_mb: float
    rss_end_mb: float
    cancelled_streams: int
    streams_refused: int
    sessions_before: int
    sessions_after_cancel: int
    sessions_after_expiry: int
    server_exit: int

    @property
    def p99_ratio(self) -> float:
        return self.accepted_p99_us / self.unloaded_p99_us

    def table(self) -> str:
        rows = [("unloaded Draft p50 / p99 (us)", f"{self.unloaded_p50_us:.0f} / {self.unloaded_p99_us:.0f}"),
                (f"overload {self.seconds:.0f} s: {self.callers} callers (10x cap {self.cap}), queue {self.queued}, "
                 f"max queue wait {self.max_queue_wait_ms:g} ms, backoff {self.backoff_ms:.0f} ms doubling", ""),
                ("  sent / OK / RESOURCE_EXHAUSTED / other", f"{self.sent} / {self.ok} / {self.resource_exhausted}"
                 f" / {self.other_errors}"),
                ("  RESOURCE_EXHAUSTED p50 (us)", f"{self.exhausted_p50_us:.0f}"),
                ("  accepted p50 / p99 (us)", f"{self.accepted_p50_us:.0f} / {self.accepted_p99_us:.0f}"),
                ("  accepted p99 / unloaded p99", f"{self.p99_ratio:.2f}x ({'within' if self.p99_ratio <= 2 else 'NOT within'}"
                 " 2x)"),
                ("  server RSS start -> end (MB)", f"{self.rss_start_mb:.1f} -> {self.rss_end_mb:.1f}"),
                (f"cancelled DraftStreams: {self.cancelled_streams} ({self.streams_refused} refused)", f"sessions {self.sessions_before} before, "
                 f"{self.sessions_after_cancel} after, {self.sessions_after_expiry} after idle expiry"),
                ("server exit code after SIGTERM", str(self.server_exit))]
        width = max(len(r[0]) for r in rows)
        return "\n".join(["Retriever overload (loopback; server and load in separate processes)"]
                         + [f"{a.ljust(width)}  {b}" for a, b in rows])


def _us(values: list[int], q: float) -> float:
    return float(np.percentile(values, q) / 1e3) if values else float("nan")


def run_overload(cap: int = 8, queued: int = 8, seconds: float = 10.0, unloaded_calls: int = 2000,
                 streams: int = 10_000, backoff_s: float = 0.02, processes: int = 2,
                 max_queue_wait_ms: float = 2.0) -> OverloadResult:
    """Runs the three phases against a server subprocess; see the module doc."""
    server = ServerProcess({"SPECDRAFT_MAX_INFLIGHT": str(cap), "SPECDRAFT_MAX_QUEUED": str(queued),
                            "SPECDRAFT_MAX_QUEUE_WAIT_MS": str(max_queue_wait_ms),
                            "SPECDRAFT_SESSION_IDLE_S": "1", "SPECDRAFT_EXPIRE_INTERVAL_S": "0.5"})
    try:
        unloaded = run_load(server.target, 1, 600, processes=1, max_calls=unloaded_calls)
        rss_start = server.rss_mb()
        load = run_load(server.target, 10 * cap, seconds, processes=processes, backoff_s=backoff_s)
        rss_end = server.rss_mb()
        time.sleep(2)  # the load's sessions expire
        before = server.sessions()
        refused = run_cancelled(server.port, streams, max(1, min(50, (cap + queued) // 2)))
        after = server.sessions()
        time.sleep(2)
        expired = server.sessions()
    finally:
        code = server.stop()
    return OverloadResult(cap, queued, 10 * cap, backoff_s * 1e3, max_queue_wait_ms, _us(unloaded.ok_ns, 50), _us(unloaded.ok_ns, 99),
                          load.sent, len(load.ok_ns), len(load.exhausted_ns), sum(load.other.values()),
                          _us(load.exhausted_ns, 50), _us(load.ok_ns, 50), _us(load.ok_ns, 99), seconds,
                          rss_start, rss_end, streams, refused, before, after, expired, code)
