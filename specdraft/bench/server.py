"""A real retriever server for the benchmarks on loopback: in this process (`local_server`)
or, as deployed, in a process of its own (`ServerProcess`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator, Sequence


def wait_serving(target: str, timeout_s: float = 300.0) -> None:
    """Blocks until the server at `target` reports SERVING on the standard health service.

    The retriever is NOT_SERVING while its indexes load. Raises TimeoutError after timeout_s.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"retriever at {target} must report SERVING, got none in {timeout_s} s")
            time.sleep(0.05)


@contextmanager
def local_server(indexes: Sequence[str] = (), max_nodes: int = 64) -> Iterator[str]:
    """A retriever server on a free 127.0.0.1 port with `indexes` loaded; yields "host:port".

    `max_nodes` is both the server's default and its cap, so requests get what they ask.
    Stopped (grace 0) on exit.
    """
    from retriever.service.server import create_server
    from retriever.service.settings import RetrieverSettings

    settings = RetrieverSettings(host="127.0.0.1", port=0, indexes=tuple(indexes),
                                 default_max_nodes=max_nodes, max_nodes_cap=max_nodes,
                                 output_log="off")  # no prior outputs from earlier runs
    server, port = create_server(settings)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target)
        yield target
    finally:
        server.stop(0).wait()


class ServerProcess:
    """`specdraft retriever serve` on 127.0.0.1 in a subprocess; `env`: extra SPECDRAFT_* settings.

    `target` once started; `rss_mb()`, `sessions()` (the /metrics gauge), `stop()` (SIGTERM; also
    on leaving a `with` block)."""

    def __init__(self, env: dict[str, str], args: tuple[str, ...] = ("--output-log", "off"),
                 start_timeout_s: float = 60.0, log_path: str | None = None) -> None:
        """`log_path`: the server's stderr (its log) is appended there; None: discarded."""
        from specdraft.bench.redis_proc import free_port

        self.metrics_port = free_port()
        cmd = [sys.executable, "-m", "specdraft.cli", "retriever", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", str(self.metrics_port), *args]
        self.log_path = log_path
        stderr = open(log_path, "a") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=stderr, text=True)
        if log_path:
            stderr.close()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"listening on \S+:(\d+)", line)
        if match is None:
            self.proc.kill()
            raise RuntimeError(f"retriever serve must print its address, got {line!r}")
        self.port = int(match.group(1))
        self.target = f"127.0.0.1:{self.port}"
        wait_serving(self.target, start_timeout_s)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def sessions(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return int(float(re.search(r"^specdraft_retriever_sessions (\S+)$", text, re.M).group(1)))

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
