"""A real retriever server for the benchmarks, started in this process on loopback."""

from __future__ import annotations

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
