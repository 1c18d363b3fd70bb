"""The verifier's servers: `create_server(settings) -> (server, port)`, already started.

The server holds one model and one `Engine`; with `settings.retriever` set it drafts through
a `RetrieverClient` (a retriever down or slow only costs speed). Over gRPC (`port`) it serves
`specdraft.v1.Verifier`, the standard health service (`grpc.health.v1`, SERVING for "" and
"specdraft.v1.Verifier" once the model is loaded) and reflection; over HTTP (`http_port`, -1:
off) the OpenAI-compatible API (`verifier.api.http_api`). Both share one `Generator` (one
generation at a time). `server.ports` holds both ports (`server.http_port`: None when off).
Prometheus metrics (`verifier.api.metrics`) are served at the HTTP API's `/metrics` and, with
`metrics_port` >= 0, on a port of their own (`server.ports.metrics`).
`server.stop(grace)` flips health to NOT_SERVING (HTTP: 503), lets in-flight generations
finish for `grace` seconds, then closes the retriever channel. `serve(settings)` runs until
SIGINT/SIGTERM. Security (SECURITY.md): the APIs' tokens (`verifier.api.auth.api_auth`) and the
retriever's channel (`settings.retriever_security()`: token file, TLS, mTLS) are read before
anything binds; a bad file raises ValueError naming its setting.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.specdraft.v1 import verifier_pb2, verifier_pb2_grpc
from retriever import errors
from verifier.api.auth import ApiAuth, ServerTls, api_auth, server_tls
from verifier.api.metrics import MetricsServer, VerifierMetrics, serve_metrics
from verifier.api.settings import VerifierSettings, env_name

if TYPE_CHECKING:
    from retriever.client import RetrieverClient
    from retriever.client.channel import ChannelSecurity
    from verifier.api.http_api import HttpApi
    from verifier.decoding.engine import Engine
    from verifier.decoding.backend import Backend
    from verifier.decoding.model import LoadedModel

log = logging.getLogger(__name__)
SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


@dataclass(frozen=True)
class ServerPorts:
    grpc: int
    http: int | None  # None: the HTTP API is off
    metrics: int | None = None  # the /metrics port of its own; None: off


class VerifierServer:
    """Started gRPC (+ HTTP) servers; `stop` and `wait_for_termination` as on `grpc.Server`."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 retriever: "RetrieverClient | None", ports: ServerPorts, http: "HttpApi | None" = None,
                 metrics_server: MetricsServer | None = None) -> None:
        self._server, self._health, self._retriever, self._http = server, health_servicer, retriever, http
        self._metrics_server = metrics_server
        self.ports = ports

    @property
    def http_port(self) -> int | None:
        return self.ports.http

    def stop(self, grace: float | None) -> threading.Event:
        """Both servers stop taking requests; the Event is set once both have stopped."""
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        waits = [self._server.stop(grace)] + ([self._http.stop(grace)] if self._http is not None else [])
        done = threading.Event()

        def finish() -> None:
            for event in waits:
                event.wait()
            if self._retriever is not None:
                self._retriever.close()
            if self._metrics_server is not None:
                self._metrics_server.stop()
            done.set()

        threading.Thread(target=finish, daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def load(settings: VerifierSettings) -> "Backend":
    """The model of the settings as its backend (`settings.backend_kind()`): llama.cpp over the GGUF
    file as it is, or HF transformers (a GGUF converted once, then cached under settings.cache_dir),
    over the static cache with CUDA graphs when `settings.static_cache_on()`, else the dynamic cache."""
    from verifier.decoding.hf import HFBackend
    from verifier.decoding.model import load_model

    if settings.backend_kind() == "llama.cpp":
        from verifier.decoding.llama_cpp import LlamaCppBackend
        from verifier.decoding.model import resolve_gguf

        return LlamaCppBackend(resolve_gguf(settings.model_spec()), max_nodes=settings.max_nodes,
                               n_threads=settings.threads)
    if settings.static_cache_on():
        from verifier.decoding.hf_static import HFStaticBackend

        return HFStaticBackend(load_model(settings.model_spec()), max_positions=settings.static_positions,
                               graphs=settings.graphs)
    return HFBackend(load_model(settings.model_spec()))


def _retriever(settings: VerifierSettings, model: "Backend",
               security: "ChannelSecurity | None") -> "RetrieverClient | None":
    if not settings.retriever:
        return None
    from retriever.client import RetrieverClient

    client = RetrieverClient(settings.retriever, settings.draft_deadline_s, security=security)
    try:
        limits = client.describe().limits
        if limits.vocab_size and limits.vocab_size != model.vocab_size:
            log.warning("retriever vocab_size %d differs from the model's %d: drafts will rarely be accepted",
                        limits.vocab_size, model.vocab_size)
    except errors.Unauthenticated as e:  # logged once by the client's refusals; sessions hold off
        client.refusals.refused(settings.default_tenant, grpc.StatusCode.UNAUTHENTICATED, str(e))
    except Exception as e:  # noqa: BLE001 - a retriever down at start-up is not fatal
        log.warning("retriever at %s did not answer Describe (%s); drafting resumes once it does",
                    settings.retriever, e)
    return client


def create_server(settings: VerifierSettings, *, model: "Backend | LoadedModel | None" = None,
                  engine: "Engine | None" = None) -> tuple[VerifierServer, int]:
    """Binds host:http_port first (0: a free port; -1: no HTTP), answering 503 while the model
    loads; loads the model and builds its `Engine` (which measures the forward cost by tree size,
    about a second on an idle CPU) unless given; binds host:port (0: a free port) and serves.
    Raises OSError when a port cannot be bound, ValueError for a bad tokens, token or PEM file."""
    security = _security(settings)
    metrics = VerifierMetrics.create()
    http = _start_http(settings, metrics, security.auth, security.tls)
    metrics_server = None
    try:
        if settings.metrics_port >= 0:
            metrics_server = serve_metrics(metrics.registry, settings.host, settings.metrics_port)
        return _create(settings, model, engine, http, metrics, metrics_server, security)
    except BaseException:
        if http is not None:
            http.stop(0)
        if metrics_server is not None:
            metrics_server.stop()
        raise


def _create(settings: VerifierSettings, model: "Backend | LoadedModel | None", engine: "Engine | None",
            http: "HttpApi | None", metrics: VerifierMetrics, metrics_server: MetricsServer | None,
            security: "_Security") -> tuple[VerifierServer, int]:
    from verifier.api.generation import Generator
    from verifier.api.grpc_service import VerifierServicer
    from verifier.decoding.engine import Engine

    if engine is None:
        engine = Engine(model if model is not None else load(settings), max_nodes=settings.max_nodes,
                        cost_store=settings.cost_store())
    model = engine.backend
    retriever = _retriever(settings, model, security.retriever)
    generator = Generator(model, engine, retriever, metrics, settings.max_queued)
    server = grpc.server(futures.ThreadPoolExecutor(settings.max_workers, thread_name_prefix="verifier"))
    verifier_pb2_grpc.add_VerifierServicer_to_server(VerifierServicer(settings, generator, security.auth), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    tls = security.tls
    port = server.add_secure_port(address, tls.grpc_credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        if retriever is not None:
            retriever.close()
        raise OSError(f"verifier address must be bindable, got {settings.host}:{settings.port} in use")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if http is not None:
        http.serve(generator)
    ports = ServerPorts(port, http.port if http is not None else None,
                        metrics_server.port if metrics_server is not None else None)
    log.info("verifier serving %s on %s: gRPC %d, HTTP %s, metrics %s (retriever: %s); auth %s, transport %s",
             settings.model, settings.host, port, ports.http if ports.http is not None else "off",
             ports.metrics if ports.metrics is not None else "off", settings.retriever or "none",
             f"on ({len(security.auth.tokens.grants)} tokens)" if security.auth.on else "off",
             "mTLS" if settings.tls_client_ca else "TLS" if tls else "plaintext")
    return VerifierServer(server, health_servicer, retriever, ports, http, metrics_server), port


def _start_http(settings: VerifierSettings, metrics: VerifierMetrics | None = None,
                auth: ApiAuth | None = None, tls: ServerTls | None = None) -> "HttpApi | None":
    if settings.http_port < 0:
        return None
    from verifier.api.http_api import start_http

    return start_http(settings, metrics=metrics, auth=auth, tls=tls)


@dataclass(frozen=True)
class _Security:
    """The verifier's credentials, read at start: its APIs' tokens, its servers' TLS, the retriever's channel."""

    auth: ApiAuth
    tls: ServerTls | None
    retriever: "ChannelSecurity | None"


def _security(settings: VerifierSettings) -> _Security:
    """The settings' credentials; ValueError (naming the setting) for a bad tokens, token or PEM file."""
    security = _Security(api_auth(settings), server_tls(settings),
                         settings.retriever_security() if settings.retriever else None)
    _check_pem_files(security.retriever)
    return security


def _check_pem_files(security: "ChannelSecurity | None") -> None:
    """ValueError (naming the setting) when a PEM file of the retriever's channel is unreadable."""
    if security is None:
        return
    for name, path in (("retriever_ca", security.root_ca), ("retriever_client_cert", security.client_cert),
                       ("retriever_client_key", security.client_key)):
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{env_name(name)} must be a readable PEM file, got {path}")


def serve(settings: VerifierSettings) -> int:
    """Serves until SIGINT/SIGTERM, then stops gracefully; returns an exit code."""
    server, port = create_server(settings)
    http = f", OpenAI HTTP API on http://{settings.host}:{server.http_port}/v1" if server.http_port is not None else ""
    print(f"verifier listening on {settings.host}:{port}{http}", flush=True)
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            server.stop(settings.grace_s)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.wait_for_termination()
    return 0
