"""A real retriever server for the benchmarks on loopback: in this process (`local_server`)
or, as deployed, in a process of its own (`server_process`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
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
    from retriever.server import create_server
    from retriever.settings import RetrieverSettings

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


@contextmanager
def server_process(indexes: Sequence[str] = (), max_nodes: int = 64) -> Iterator[str]:
    """`specdraft retriever serve` in a child process on a free 127.0.0.1 port, configured as
    `local_server`'s; yields "host:port" once it is SERVING. Stopped by SIGTERM on exit
    (killed after 30 s). Raises RuntimeError with the child's stderr if it does not start."""
    args = [sys.executable, "-m", "specdraft.cli", "retriever", "serve", "--port", "0", "--max-nodes", str(max_nodes),
            "--output-log", "off", *(a for ix in indexes for a in ("--index", ix))]
    with tempfile.TemporaryFile("w+") as log:  # its stderr: never a full pipe blocking it
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "SPECDRAFT_HOST": "127.0.0.1"})
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("retriever listening on "):
                proc.wait(30)
                log.seek(0)
                raise RuntimeError(f"retriever must start, got {line!r}: {log.read()[-2000:]}")
            target = line.split()[-1]
            wait_serving(target)
            yield target
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
