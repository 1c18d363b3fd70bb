"""`specdraft bench overload`: the retriever under 10x its concurrency cap, on loopback (issue 6).

A server is started here (no indexes: drafts from the session context only) with
`max_inflight=cap`, `max_queued=queued`. Phases, each bounded in count and time:
1. unloaded: sequential unary `Draft` calls -> p50/p99;
2. overload: `10 * cap` concurrent closed-loop callers (grpc.aio, one session each, re-sent
   prompt) for `seconds` -> OK and RESOURCE_EXHAUSTED counts, accepted calls' p99 vs 2x unloaded,
   and the server process's RSS before and after (client and server share this process);
3. cancelled streams: `streams` DraftStreams cancelled after their first answer -> sessions and
   loop tasks left once the server had `settle_s` (idle expiry at 1 s ends any the cancel missed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]


@dataclass(frozen=True)
class OverloadResult:
    cap: int
    queued: int
    callers: int
    unloaded_p50_us: float
    unloaded_p99_us: float
    ok: int
    resource_exhausted: int
    other_errors: int
    accepted_p99_us: float
    rss_before_mb: float
    rss_after_mb: float
    cancelled_streams: int
    sessions_left: int
    tasks_left: int

    @property
    def p99_within_2x(self) -> bool:
        return self.accepted_p99_us <= 2 * self.unloaded_p99_us

    def table(self) -> str:
        rows = [("unloaded Draft p50 / p99 (us)", f"{self.unloaded_p50_us:.0f} / {self.unloaded_p99_us:.0f}"),
                (f"overload: {self.callers} callers, cap {self.cap}, queue {self.queued}", ""),
                ("  OK / RESOURCE_EXHAUSTED / other", f"{self.ok} / {self.resource_exhausted} / {self.other_errors}"),
                ("  accepted p99 (us) vs 2x unloaded p99", f"{self.accepted_p99_us:.0f} vs "
                 f"{2 * self.unloaded_p99_us:.0f} ({'met' if self.p99_within_2x else 'NOT met'})"),
                ("  RSS before -> after (MB)", f"{self.rss_before_mb:.1f} -> {self.rss_after_mb:.1f}"),
                (f"cancelled DraftStreams: {self.cancelled_streams}",
                 f"sessions left {self.sessions_left}, extra loop tasks {self.tasks_left}")]
        width = max(len(r[0]) for r in rows)
        return "\n".join(["Retriever overload (loopback, in-process server)"] + [f"{a.ljust(width)}  {b}" for a, b in rows])


def rss_mb() -> float:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _unloaded(stub, pb, calls: int) -> np.ndarray:
    out = []
    for i in range(calls + 50):
        t0 = time.perf_counter_ns()
        stub.Draft(pb.DraftRequest(tenant="u", session_id="u", prompt=PROMPT), timeout=10)
        if i >= 50:
            out.append(time.perf_counter_ns() - t0)
    return np.asarray(out, np.int64)


async def _overload(target: str, callers: int, seconds: float) -> tuple[list[int], int, int]:
    """(accepted latencies ns, RESOURCE_EXHAUSTED count, other errors) of `callers` closed loops."""
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    ok: list[int] = []
    counts = {"exhausted": 0, "other": 0}
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RetrieverStub(channel)

        async def caller(i: int) -> None:
            request = pb.DraftRequest(tenant="o", session_id=f"c{i}", prompt=PROMPT)
            while time.monotonic() < end:
                t0 = time.perf_counter_ns()
                try:
                    await stub.Draft(request, timeout=30)
                    ok.append(time.perf_counter_ns() - t0)
                except grpc.aio.AioRpcError as e:
                    counts["exhausted" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "other"] += 1
                    await asyncio.sleep(0.001)  # a refused caller backs off a little

        await asyncio.gather(*(caller(i) for i in range(callers)))
    return ok, counts["exhausted"], counts["other"]


async def cancelled_streams(port: int, n: int, concurrency: int = 50) -> None:
    """n DraftStreams to 127.0.0.1:port, each cancelled after its first answer (every 4th before
    sending anything); 3/4 of n sessions are started."""
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)

        async def one(i: int) -> None:
            call = stub.DraftStream(timeout=10)
            if i % 4:
                await call.write(pb.DraftRequest(tenant="c", session_id=f"s{i}", prompt=PROMPT))
                await call.read()
            call.cancel()

        for start in range(0, n, concurrency):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + concurrency))))


def run_overload(cap: int = 64, queued: int = 64, seconds: float = 10.0, unloaded_calls: int = 2000,
                 streams: int = 10_000, settle_s: float = 3.0) -> OverloadResult:
    """Runs the three phases against a server started here; see the module doc."""
    import grpc

    from protos.specdraft.v1 import retriever_pb2 as pb
    from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
    from retriever.server import create_server
    from retriever.settings import RetrieverSettings
    from specdraft.bench.server import wait_serving

    settings = RetrieverSettings(host="127.0.0.1", port=0, output_log="off", max_inflight=cap, max_queued=queued,
                                 session_idle_s=1.0, expire_interval_s=0.5)
    server, port = create_server(settings)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as channel:
            unloaded = _unloaded(pb_grpc.RetrieverStub(channel), pb, unloaded_calls)
        rss_before = rss_mb()
        ok, exhausted, other = asyncio.run(_overload(target, 10 * cap, seconds))
        rss_after = rss_mb()
        sessions, tasks = _cancel_phase(server, port, streams, settle_s)
    finally:
        server.stop(0).wait()
    p50, p99 = (np.percentile(unloaded, [50, 99]) / 1e3).tolist()
    accepted_p99 = float(np.percentile(ok, 99) / 1e3) if ok else float("nan")
    return OverloadResult(cap, queued, 10 * cap, p50, p99, len(ok), exhausted, other, accepted_p99,
                          rss_before, rss_after, streams, sessions, tasks)


def _cancel_phase(server, port: int, streams: int, settle_s: float) -> tuple[int, int]:
    """(sessions left, loop tasks above the count before) after `streams` cancelled DraftStreams."""
    def on_loop(fn):
        async def call():
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), server._loop).result(10)

    servicer = server._inner.servicer
    tasks_before = on_loop(lambda: len(asyncio.all_tasks()))
    asyncio.run(cancelled_streams(port, streams))
    time.sleep(settle_s)
    return (on_loop(lambda: servicer._drafter.stats().sessions),
            on_loop(lambda: len(asyncio.all_tasks())) - tasks_before)
