"""Graceful shutdown under load (issue 6): a real `specdraft retriever serve` subprocess with the
file output log, Draft/EndSession calls from client threads and an open DraftStream; on SIGTERM
a Health.Watch sees NOT_SERVING, the in-flight stream still gets answers, new calls get
UNAVAILABLE (from the server itself during the drain, never CANCELLED), the process exits
0 within the grace period, and the output of every session that reached the server is in the
SQLite log afterwards, once and whole: those ended by EndSession, and those still open (the
stream's, and any whose EndSession was refused), which the server ends at shutdown."""

from __future__ import annotations

import queue
import signal
import sqlite3
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever.outputlog.file_log import log_path
from specdraft.bench.server import ServerProcess

GRACE_S = 3.0
PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]


def output_of(name: str) -> list[int]:
    """A session's output tokens: its name spelled out (distinct per session), then an end mark."""
    return [1000 + ord(ch) for ch in name] + [999]


class Caller(threading.Thread):
    """Starts, extends and ends sessions until a call fails; records the ended sessions."""

    def __init__(self, target: str, name: str) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(target)
        self.stub, self.name = pb_grpc.RetrieverStub(self.channel), name
        self.ended: list[str] = []
        self.extended: list[str] = []  # sessions whose output reached the server (ended or still open)
        self.failure: grpc.StatusCode | None = None
        self.failed_call_sent_s = 0.0  # time.monotonic() when the failed call was sent

    def run(self) -> None:
        for i in range(100_000):
            sid = f"{self.name}-{i}"
            calls = [(self.stub.Draft, pb.DraftRequest(tenant="t", session_id=sid, prompt=PROMPT)),
                     (self.stub.Draft, pb.DraftRequest(tenant="t", session_id=sid, new_tokens=output_of(sid))),
                     (self.stub.EndSession, pb.EndSessionRequest(tenant="t", session_id=sid))]
            for k, (rpc, request) in enumerate(calls):
                self.failed_call_sent_s = time.monotonic()
                try:
                    rpc(request, timeout=5)
                except grpc.RpcError as e:
                    self.failure = (e.code(), e.details())
                    return
                if k == 1:
                    self.extended.append(sid)
            self.ended.append(sid)


def logged_outputs(data_dir) -> list[list[int]]:
    with sqlite3.connect(log_path(data_dir)) as db:
        return [np.frombuffer(blob, "<i4").tolist() for (blob,) in db.execute("SELECT tokens FROM entries")]


def test_sigterm_under_load_drains_in_flight_calls_refuses_new_ones_and_loses_no_output(tmp_path):
    server = ServerProcess({"SPECDRAFT_GRACE_S": str(GRACE_S)},
                           ("--output-log", "file", "--data-dir", str(tmp_path)))
    try:
        channel = grpc.insecure_channel(server.target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        requests: queue.Queue = queue.Queue()
        requests.put(pb.DraftRequest(tenant="t", session_id="stream", prompt=PROMPT))
        replies = pb_grpc.RetrieverStub(channel).DraftStream(iter(requests.get, None), timeout=30)
        assert next(replies).context_tokens == len(PROMPT)
        callers = [Caller(server.target, f"c{k}") for k in range(2)]
        for c in callers:
            c.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        requests.put(pb.DraftRequest(tenant="t", session_id="stream", new_tokens=output_of("stream")))
        assert next(replies).context_tokens == len(PROMPT) + len(output_of("stream"))  # in flight: still answered
        requests.put(None)  # the stream ends normally, well inside the grace period; its session stays open
        assert list(replies) == []
        for c in callers:
            c.join(GRACE_S + 5)
            assert not c.is_alive() and len(c.ended) > 5
            # only calls sent at or after the signal fail, answered UNAVAILABLE during the drain
            # (stopping at once would cancel the calls grpc core had received but not handed over)
            assert c.failed_call_sent_s >= t0 - 0.05, c.failure
            assert c.failure == (grpc.StatusCode.UNAVAILABLE,
                                 "retriever must be serving, got a new call while it shuts down"), c.failure
        with grpc.insecure_channel(server.target) as fresh:
            try:
                pb_grpc.RetrieverStub(fresh).Describe(pb.DescribeRequest(), timeout=2)
                raise AssertionError("a new call must be refused during shutdown")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert server.proc.wait(GRACE_S + 5) == 0 and time.monotonic() - t0 < GRACE_S + 3
        channel.close()
    finally:
        server.stop()
    logged = logged_outputs(tmp_path)
    # every session whose output reached the server, each once and whole: those ended by
    # EndSession and those left open when their EndSession was refused (ended at shutdown)
    want = [output_of(sid) for c in callers for sid in c.extended] + [output_of("stream")]
    assert sorted(map(tuple, logged)) == sorted(map(tuple, want))
