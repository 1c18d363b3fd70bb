"""`specdraft bench log --end-session N`: what a durable EndSession costs (issue 18 item 8).

For each store (file: SQLite in a temp dir; redis: a local redis-server started here) and each
mode (`durable_end_session` off / on), a real retriever (`create_server`, no indexes, on a free
loopback port) serves N sessions in turn: Draft a 64-token prompt, Draft 256 new tokens,
EndSession, the EndSession timed at the client. Prints p50 / p99 / mean EndSession latency per
store and mode. Off, EndSession answers once the output is queued; on, once it is committed
(file, fsynced: synchronous=FULL) or acknowledged by Redis.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from specdraft.bench.redis_proc import REDIS_SERVER, RedisServer


@dataclass(frozen=True)
class EndSessionLatency:
    store: str  # "file" | "redis"
    durable: bool
    sessions: int
    p50_us: float
    p99_us: float
    mean_us: float

    def row(self) -> str:
        mode = "durable" if self.durable else "queued"
        return (f"  {self.store:<6} {mode:<8} {self.sessions:>6} {self.p50_us:>10.0f} {self.p99_us:>10.0f} "
                f"{self.mean_us:>10.0f}")


def _time_sessions(target: str, sessions: int) -> list[float]:
    """EndSession latencies (µs) of `sessions` sessions, each with a distinct 256-token output."""
    rng = np.random.default_rng(0)
    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for i in range(sessions):
            sid = f"bench-{i}"
            prompt, new = rng.integers(0, 30_000, 64).tolist(), rng.integers(0, 30_000, 256).tolist()
            stub.Draft(pb.DraftRequest(tenant="t", session_id=sid, prompt=prompt, max_nodes=8), timeout=10)
            stub.Draft(pb.DraftRequest(tenant="t", session_id=sid, new_tokens=new, max_nodes=8), timeout=10)
            t0 = time.perf_counter()
            stub.EndSession(pb.EndSessionRequest(tenant="t", session_id=sid), timeout=10)
            out.append((time.perf_counter() - t0) * 1e6)
    return out


def measure(store: str, durable: bool, sessions: int, workdir: Path, redis_url: str = "") -> EndSessionLatency:
    """One store and mode (see the module docstring)."""
    from retriever.service.server import create_server
    from retriever.service.settings import RetrieverSettings
    from specdraft.bench.server import wait_serving

    settings = RetrieverSettings(host="127.0.0.1", port=0, metrics_port=-1, output_log=store, redis_url=redis_url,
                                 data_dir=str(workdir / f"{store}-{durable}"), durable_end_session=durable)
    server, port = create_server(settings)
    try:
        wait_serving(f"127.0.0.1:{port}", 30)
        _time_sessions(f"127.0.0.1:{port}", min(20, sessions))  # warm-up: channels, page cache
        lat = np.asarray(_time_sessions(f"127.0.0.1:{port}", sessions))
    finally:
        server.stop(1).wait(10)
    return EndSessionLatency(store, durable, sessions, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
                             float(lat.mean()))


def bench_end_session(sessions: int, stores: list[str]) -> list[EndSessionLatency]:
    """Every store of `stores` ("file", "redis": skipped without redis-server), off then on."""
    results = []
    with tempfile.TemporaryDirectory(prefix="specdraft-end-session-") as tmp:
        for store in stores:
            redis = None
            if store == "redis":
                if REDIS_SERVER is None:
                    continue
                (Path(tmp) / "redis").mkdir()
                redis = RedisServer(Path(tmp) / "redis").start()
            try:
                for durable in (False, True):
                    results.append(measure(store, durable, sessions, Path(tmp), redis.url if redis else ""))
            finally:
                if redis is not None:
                    redis.kill()
    return results


def table(results: list[EndSessionLatency]) -> str:
    head = f"EndSession latency (µs), client-side, loopback\n  {'store':<6} {'mode':<8} {'calls':>6} " \
           f"{'p50':>10} {'p99':>10} {'mean':>10}"
    return "\n".join([head, *(r.row() for r in results)])
