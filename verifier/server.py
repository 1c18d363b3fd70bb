"""The verifier's gRPC server: `create_server(settings) -> (server, port)`, already started.

The server holds one model and one `Engine`; with `settings.retriever` set it drafts through
a `RetrieverClient` (a retriever down or slow only costs speed). It serves
`specdraft.v1.Verifier`, the standard health service (`grpc.health.v1`, SERVING for "" and
"specdraft.v1.Verifier" once the model is loaded) and reflection. `server.stop(grace)`
flips health to NOT_SERVING, lets in-flight generations finish for `grace` seconds, then
closes the retriever channel. `serve(settings)` runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.specdraft.v1 import verifier_pb2, verifier_pb2_grpc
from verifier.settings import VerifierSettings

if TYPE_CHECKING:
    from retriever.client import RetrieverClient
    from verifier.engine import Engine
    from verifier.model import LoadedModel

log = logging.getLogger(__name__)
SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


class VerifierServer:
    """A started gRPC server; `stop` and `wait_for_termination` as on `grpc.Server`."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 retriever: "RetrieverClient | None") -> None:
        self._server, self._health, self._retriever = server, health_servicer, retriever

    def stop(self, grace: float | None) -> threading.Event:
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        done = self._server.stop(grace)
        if self._retriever is not None:
            retriever = self._retriever
            threading.Thread(target=lambda: (done.wait(), retriever.close()), daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def load(settings: VerifierSettings) -> "LoadedModel":
    """The model of the settings (converted once, then cached under settings.cache_dir)."""
    from verifier.model import ModelSpec, load_model

    return load_model(ModelSpec(settings.model, dtype=settings.dtype, device=settings.device,
                                cache_dir=settings.cache_dir or None))


def _retriever(settings: VerifierSettings, model: "LoadedModel") -> "RetrieverClient | None":
    if not settings.retriever:
        return None
    from retriever.client import RetrieverClient

    client = RetrieverClient(settings.retriever, settings.draft_deadline_s)
    try:
        limits = client.describe().limits
        if limits.vocab_size and limits.vocab_size != model.vocab_size:
            log.warning("retriever vocab_size %d differs from the model's %d: drafts will rarely be accepted",
                        limits.vocab_size, model.vocab_size)
    except Exception as e:  # noqa: BLE001 - a retriever down at start-up is not fatal
        log.warning("retriever at %s did not answer Describe (%s); drafting resumes once it does",
                    settings.retriever, e)
    return client


def create_server(settings: VerifierSettings, *, model: "LoadedModel | None" = None,
                  engine: "Engine | None" = None) -> tuple[VerifierServer, int]:
    """Loads the model and builds its `Engine` (which measures the forward cost by tree size,
    about a second on an idle CPU) unless given, binds host:port (0: a free port), serves."""
    from verifier.engine import Engine
    from verifier.service import VerifierServicer

    if engine is None:
        engine = Engine(model if model is not None else load(settings), max_nodes=settings.max_nodes)
    model = engine.loaded
    retriever = _retriever(settings, model)
    server = grpc.server(futures.ThreadPoolExecutor(settings.max_workers, thread_name_prefix="verifier"))
    verifier_pb2_grpc.add_VerifierServicer_to_server(VerifierServicer(settings, model, engine, retriever), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"verifier address must be bindable, got {settings.host}:{settings.port} in use")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("verifier serving %s on %s:%d (retriever: %s)", settings.model, settings.host, port,
             settings.retriever or "none")
    return VerifierServer(server, health_servicer, retriever), port


def serve(settings: VerifierSettings) -> int:
    """Serves until SIGINT/SIGTERM, then stops gracefully; returns an exit code."""
    server, port = create_server(settings)
    print(f"verifier listening on {settings.host}:{port}", flush=True)
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            server.stop(settings.grace_s)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.wait_for_termination()
    return 0
