"""Draft latency: in-process `Drafter.draft`, loopback gRPC `Draft` and `DraftStream`.

Each path replays the traces (greedy MAT replay, see `replay.py`) and records the wall
time of every drafting call (`time.perf_counter_ns`): in-process around `Drafter.draft`;
over gRPC around one unary `Draft` round trip, or one request/response pair of a
`DraftStream` (one stream per generation). Targets (issue 2), with a ~20M-token corpus
loaded: in-process p50 <= 50 us and p99 <= 500 us; `Draft` p50 <= 1 ms; `DraftStream`
p50 below `Draft` p50; checking one step's request (`validate_draft`) p50 <= 50 us. A health
Check row shows the loopback gRPC floor of the machine.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from specdraft.bench.backends import Backend, GrpcBackend, InProcessBackend, open_indexes
from specdraft.bench.replay import Trace, replay
from specdraft.bench.server import ServerProcess

IN_PROCESS_P50_US, IN_PROCESS_P99_US, UNARY_P50_US = 50.0, 500.0, 1000.0
VALIDATION_P50_US = 50.0  # checking one step's request, within the in-process budget


@dataclass(frozen=True)
class LatencyRow:
    """Percentiles of one call path, with its target and whether it is met."""

    path: str
    calls: int
    p50_us: float
    p99_us: float
    target: str
    met: bool


@dataclass(frozen=True)
class LatencyResult:
    indexes: tuple[str, ...]
    corpus_tokens: int
    max_nodes: int
    rows: tuple[LatencyRow, ...]

    def table(self) -> str:
        """The figures as an aligned markdown table, targets beside them."""
        head = ("path", "calls", "p50 (us)", "p99 (us)", "target", "met")
        rows = [head] + [(r.path, str(r.calls), f"{r.p50_us:.1f}", f"{r.p99_us:.1f}", r.target,
                          "yes" if r.met else "NO") for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        title = (f"Draft latency: max_nodes={self.max_nodes} corpus tokens={self.corpus_tokens:,} "
                 f"indexes={list(self.indexes) or 'none'}")
        return "\n".join([title, *lines])


class _Recorder:
    """A backend wrapper that keeps every session it opens, to read their latencies."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.name = backend, backend.name
        self.sessions: list = []

    def session(self, tenant: str, session_id: str):
        s = self.backend.session(tenant, session_id)
        self.sessions.append(s)
        return s

    def close(self) -> None:
        pass


def measure(backend: Backend, traces: dict[str, list[Trace]], max_nodes: int, warmup: int = 2) -> np.ndarray:
    """Latencies (ns, int64) of every drafting call of a replay through `backend`.

    The first `warmup` requests of each workload are replayed first, untimed.
    """
    replay(backend, {w: g[:warmup] for w, g in traces.items()}, max_nodes)
    recorder = _Recorder(backend)
    replay(recorder, traces, max_nodes)
    return np.asarray([ns for s in recorder.sessions for ns in s.latencies_ns], np.int64)


def transport_floor(target: str, calls: int = 2000) -> np.ndarray:
    """Latencies (ns) of the cheapest unary call, a health Check: the loopback gRPC floor."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        out = []
        for i in range(calls + 100):  # the first 100 warm up
            t0 = time.perf_counter_ns()
            stub.Check(request)
            if i >= 100:
                out.append(time.perf_counter_ns() - t0)
    return np.asarray(out, np.int64)


def validation_ns(calls: int = 2000) -> np.ndarray:
    """ns of `validate_draft` on a typical step's request (5 new tokens), per call."""
    from protos.specdraft.v1 import retriever_pb2 as pb
    from retriever.service.settings import RetrieverSettings
    from retriever.service.validation import validate_draft

    limits = RetrieverSettings().limits(151_936)
    request = pb.DraftRequest(tenant="tenant-1", session_id="0123456789abcdef", new_tokens=[11, 12, 13, 14, 15])
    out = []
    for i in range(calls + 100):  # the first 100 warm up
        t0 = time.perf_counter_ns()
        validate_draft(request.tenant, request.session_id, request.prompt, request.new_tokens, request.max_nodes,
                       limits)
        if i >= 100:
            out.append(time.perf_counter_ns() - t0)
    return np.asarray(out, np.int64)


def _row(path: str, ns: np.ndarray, target: str, met) -> LatencyRow:
    p50, p99 = (np.percentile(ns, [50, 99]) / 1e3).tolist() if len(ns) else (float("nan"),) * 2
    return LatencyRow(path, int(len(ns)), p50, p99, target, bool(met(p50, p99)))


def run_latency(
    traces: dict[str, list[Trace]],
    indexes: Sequence[str] = (),
    max_nodes: int = 64,
    target: str | None = None,
) -> LatencyResult:
    """Measures the three paths; gRPC against `target`, or a server process started here on
    loopback (its own process, as deployed: the client's Python does not share its GIL)."""
    corpora = open_indexes(indexes)
    corpus_tokens = sum(int(ds.manifest.num_tokens) for ds in corpora)
    in_proc = InProcessBackend.open(indexes)
    rows = [_row("in-process Drafter.draft", measure(in_proc, traces, max_nodes),
                 f"p50 <= {IN_PROCESS_P50_US:g}, p99 <= {IN_PROCESS_P99_US:g}",
                 lambda p50, p99: p50 <= IN_PROCESS_P50_US and p99 <= IN_PROCESS_P99_US),
            _row("request validation (validate_draft)", validation_ns(), f"p50 <= {VALIDATION_P50_US:g}",
                 lambda p50, p99: p50 <= VALIDATION_P50_US)]
    del in_proc
    args = ("--output-log", "off", "--max-nodes", str(max_nodes), *(a for ix in indexes for a in ("--index", ix)))
    with ServerProcess({}, args, start_timeout_s=300.0) if target is None else nullcontext() as server:
        addr = target if server is None else server.target
        floor_ns = transport_floor(addr)
        unary = GrpcBackend(addr, "unary")
        unary.wait_ready()
        unary_ns = measure(unary, traces, max_nodes)
        stream = GrpcBackend(addr, "stream")
        stream_ns = measure(stream, traces, max_nodes)
        unary.close()
        stream.close()
    unary_row = _row("gRPC Draft (unary)", unary_ns, f"p50 <= {UNARY_P50_US:g}",
                     lambda p50, p99: p50 <= UNARY_P50_US)
    stream_row = _row("gRPC DraftStream (per step)", stream_ns, "p50 < Draft p50",
                      lambda p50, p99: p50 < unary_row.p50_us)
    floor_row = _row("gRPC Health.Check (loopback floor)", floor_ns, "(reference)", lambda p50, p99: True)
    return LatencyResult(tuple(indexes), corpus_tokens, max_nodes, (*rows, unary_row, stream_row, floor_row))

