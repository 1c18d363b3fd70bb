"""The retriever's gRPC server (grpc.aio).

- `start(settings)` (on a running loop) -> `AioRetrieverServer`: binds host:port (0: a free
  port), serves `specdraft.v1.Retriever`, the standard health service (`grpc.health.v1`:
  "" and "specdraft.v1.Retriever" NOT_SERVING until the indexes are loaded, then SERVING)
  and, with `settings.reflection`, reflection. The indexes load on a thread after the
  server started; a failure is logged and leaves health NOT_SERVING. Idle sessions are
  ended every `settings.expire_interval_s`. The shared output log (`settings.output_log`,
  docs/OUTPUT_LOG.md) is replayed into the drafter from the start; with
  `log_warmup_gate=not_serving` health stays NOT_SERVING until the replay is done (or
  `log_warmup_timeout_s` passed); "specdraft.v1.OutputLog" reports the log's own health
  (SERVING: replayed and reachable). With `settings.metrics_port` >= 0, Prometheus metrics
  (`retriever.service.metrics`) are served at http://host:metrics_port/metrics from the same loop.
- `create_server(settings) -> (RetrieverServer, port)`: the same on its own event-loop
  thread, driven like a `grpc.Server` from synchronous code (`stop(grace, drain_s=0)` returns
  an Event).
- `serve(settings)`: runs until SIGINT/SIGTERM, then stops gracefully (`drain_s`: new calls
  answered UNAVAILABLE by the server itself first, then `grace_s` for the calls in flight);
  exit code 1 when the indexes fail to load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.specdraft.v1 import retriever_pb2
from retriever import errors
from retriever.drafting.drafter import Drafter
from retriever.outputlog.contract import LogUnavailable
from retriever.outputlog.membership import Membership, Placement
from retriever.outputlog.sync import LogSync, open_log
from retriever.service.auth import guard, load_security
from retriever.service.event_loop import new_event_loop
from retriever.service.metrics import RetrieverMetrics, bound_port, serve_metrics
from retriever.service.routing import Routing
from retriever.service.servicer import RetrieverServicer
from retriever.service.settings import RetrieverSettings
from retriever.service.wire import add_retriever
from retriever.store import loading

if TYPE_CHECKING:
    from retriever.store.datastore import CorpusDatastore
    from retriever.store.faiss_store import FaissStore

log = logging.getLogger(__name__)
SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["Retriever"].full_name
HEALTH_NAMES = ("", SERVICE_NAME)
LOG_HEALTH_NAME = "specdraft.v1.OutputLog"  # SERVING once the log is replayed and reachable
FLUSH_S = 2.0  # at shutdown: longest wait for queued outputs to reach the log
MAX_MESSAGE_BYTES = 64 << 20  # a DraftBatch restarting many long sessions is large
Loader = Callable[[RetrieverSettings], "list[CorpusDatastore | FaissStore]"]
_T = TypeVar("_T")


def load_indexes(settings: RetrieverSettings) -> list["CorpusDatastore | FaissStore"]:
    """The settings' indexes, checked against their tokenizer (`retriever.store.loading`); the default Loader."""
    return loading.load_indexes(settings.indexes, settings.tokenizer)


async def _in_daemon_thread(fn: Callable[..., _T], *args: object) -> _T:
    """`fn(*args)` on a daemon thread (a stop never waits for a long load)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if future.done():  # cancelled: the server stopped first
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            future.set_exception(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            ok, value = True, fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, e
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=work, name="retriever-load-indexes", daemon=True).start()
    return await future


async def _load(settings: RetrieverSettings, loader: Loader, servicer: RetrieverServicer,
                health_servicer: health.aio.HealthServicer, sync: LogSync | None = None) -> bool:
    """Loads the indexes (and with the not_serving gate waits for the output log's replay),
    then serves (health SERVING); False (logged) when loading failed."""
    try:
        corpora = await _in_daemon_thread(loader, settings)
    except Exception as e:  # noqa: BLE001 - reported through health, the log and serve's exit code
        expected = isinstance(e, errors.SpecdraftError)
        log.error("retriever indexes failed to load: %s", e, exc_info=None if expected else e)
        servicer.set_failed(str(e))
        return False
    servicer.set_corpora(corpora)
    if sync is not None and settings.log_warmup_gate == "not_serving":
        await _wait_warm(sync, settings.log_warmup_timeout_s)
    for name in HEALTH_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("retriever serving %d indexes (%s tokens)", len(corpora),
             sum(c.manifest.num_tokens for c in corpora))
    return True


async def _wait_warm(sync: LogSync, timeout_s: float) -> None:
    """Waits for the output log's replay (timeout 0: no limit), logging progress every 5 s."""
    deadline = time.monotonic() + timeout_s if timeout_s else math.inf
    while not await sync.wait_warm(min(5.0, max(0.0, deadline - time.monotonic()))):
        h = sync.health()
        if time.monotonic() >= deadline:
            log.warning("output log replay not done after %.0f s (%d tokens replayed): serving without the rest",
                        timeout_s, h.warmup_tokens)
            return
        log.info("output log replay: %d outputs, %d of %d tokens in %.0f s%s", h.warmup_entries, h.warmup_tokens,
                 h.warmup_total_tokens, h.warmup_s, "" if h.reading else " (log unreachable, retrying)")


async def _report_log_health(sync: LogSync, health_servicer: health.aio.HealthServicer,
                             interval_s: float = 1.0) -> None:
    """Keeps LOG_HEALTH_NAME at SERVING while the log is replayed and reachable, else NOT_SERVING."""
    last = None
    while True:
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if sync.health().degraded
                  else health_pb2.HealthCheckResponse.SERVING)
        if status != last:
            await health_servicer.set(LOG_HEALTH_NAME, status)
            last = status
        await asyncio.sleep(interval_s)


def _log_sync(settings: RetrieverSettings) -> LogSync | None:
    """The output log's LogSync (None when off); OSError when the store cannot be opened."""
    config = settings.log_config()
    if config is None:
        return None
    try:
        return LogSync(open_log(config), config, settings.replica_id or None)
    except (LogUnavailable, ValueError) as e:
        raise OSError(f"output log must open, got {e}") from None


async def _place(settings: RetrieverSettings, sync: LogSync, port: int) -> None:
    """Gives `sync` its Placement (when on: Redis, `settings.placement`) and registers once (a
    failure is retried by the placement's own task)."""
    config = settings.placement_config(sync.replica_id, port)
    log_config = settings.log_config()
    if config is None or log_config is None:
        return
    sync.placement = Placement(Membership(log_config), config)
    try:
        await sync.placement.refresh()
    except LogUnavailable as e:
        log.warning("placement: first registration failed, retrying in the background: %s", e)
    log.info("placement: replica %s at %s, %d owners per tenant, %d live replicas", config.replica_id,
             config.address, config.owners, len(sync.placement.members))


async def _expire_periodically(servicer: RetrieverServicer, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            servicer.expire_idle()
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("ending idle sessions failed")


# ---------------------------------------------------------------- the server on a running loop


class AioRetrieverServer:
    """A started server on the current loop. `loaded` resolves to True once the indexes are
    loaded, False when loading failed."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 servicer: RetrieverServicer, loaded: "asyncio.Task[bool]", expiry: "asyncio.Task[None]",
                 sync: LogSync | None = None, log_health: "asyncio.Task[None] | None" = None,
                 metrics_server: asyncio.Server | None = None) -> None:
        self.server, self.port, self.servicer = server, port, servicer
        self.loaded, self._health, self._expiry = loaded, health_servicer, expiry
        self.sync, self._log_health = sync, log_health
        self._metrics_server = metrics_server
        self.metrics_port = bound_port(metrics_server) if metrics_server is not None else None  # None: off

    async def stop(self, grace: float | None, drain_s: float = 0.0) -> None:
        """Health NOT_SERVING, new calls UNAVAILABLE, in-flight calls get `grace` seconds (None:
        forever); then, with an output log, every session still open is ended and the log is
        flushed (at most FLUSH_S), so no finished output is lost. For `drain_s` before that the
        server still takes calls in and answers new ones UNAVAILABLE itself: calls grpc has already
        received then get that answer, where stopping at once would cancel them (CANCELLED)."""
        await self._health.enter_graceful_shutdown()
        if drain_s > 0:
            self.servicer.drain()
            await asyncio.sleep(drain_s)
        self._expiry.cancel()
        self.loaded.cancel()
        await self.server.stop(grace)
        if self._log_health is not None:
            self._log_health.cancel()
        if self.sync is not None:  # after the calls: outputs of sessions ended in the grace go out too
            ended = self.servicer.end_all_sessions()
            if ended:
                log.info("ended %d open sessions at shutdown", ended)
            await self.sync.stop(flush_s=FLUSH_S)
        if self._metrics_server is not None:
            self._metrics_server.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _grpc_server(settings: RetrieverSettings, servicer: RetrieverServicer,
                 health_servicer: health.aio.HealthServicer) -> tuple[grpc.aio.Server, int]:
    tokens, credentials = load_security(settings)
    log.info("retriever auth %s, transport %s", f"on ({len(tokens.grants)} tokens)" if tokens else "off",
             "mTLS" if settings.tls_client_ca else "TLS" if credentials else "plaintext")
    # no maximum_concurrent_rpcs: health checks are never refused; streams and drafting have caps of
    # their own (retriever.service.admission)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    add_retriever(guard(servicer, tokens), server, servicer.metrics.rejected)  # bad wire bytes: INVALID_ARGUMENT
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = _address(settings.host, settings.port)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"retriever address must be bindable, got {address} ({e})") from None
    if port == 0:
        raise OSError(f"retriever address must be bindable, got {address}")
    return server, port


async def start(settings: RetrieverSettings, loader: Loader = load_indexes,
                drafter: "Drafter | None" = None) -> AioRetrieverServer:
    """Binds and starts the server on the running loop; the indexes load in the background.

    `drafter`: the one to serve with, as is; default: one from the settings, wired to the
    output log (a drafter passed in gets no log).
    """
    sync = _log_sync(settings) if drafter is None else None
    if drafter is None:
        drafter = Drafter(settings.drafter_config(), on_output=sync.publish if sync is not None else None)
    metrics = RetrieverMetrics.create()
    durable = (functools.partial(sync.published, settings.durable_timeout_s)
               if sync is not None and settings.durable_end_session else None)
    routing = Routing(sync) if sync is not None and settings.placement_config(sync.replica_id, 0) else None
    servicer = RetrieverServicer(settings, drafter, metrics, durable, routing)
    metrics.watch(drafter.stats, lambda: servicer.ready, sync.health if sync is not None else None)
    health_servicer = health.aio.HealthServicer()
    for name in (*HEALTH_NAMES, *((LOG_HEALTH_NAME,) if sync is not None else ())):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    metrics_server = None
    try:
        if settings.metrics_port >= 0:
            metrics_server = await serve_metrics(metrics.registry, settings.host, settings.metrics_port)
        server, port = _grpc_server(settings, servicer, health_servicer)
    except BaseException:
        if metrics_server is not None:
            metrics_server.close()
        if sync is not None:
            await sync.log.close()
        raise
    await server.start()
    log_health = None
    if sync is not None:
        if routing is not None:
            await _place(settings, sync, port)
        await sync.start(drafter)
        log_health = asyncio.create_task(_report_log_health(sync, health_servicer))
        log.info("output log: %s (replica %s), warm-up gate %s", sync.log.name, sync.replica_id,
                 settings.log_warmup_gate)
    log.info("retriever listening on %s (%d index dirs to load, %s event loop)", _address(settings.host, port),
             len(settings.indexes), type(asyncio.get_running_loop()).__module__.split(".")[0])
    if metrics_server is not None:
        log.info("retriever metrics on http://%s/metrics", _address(settings.host, bound_port(metrics_server)))
    loaded = asyncio.create_task(_load(settings, loader, servicer, health_servicer, sync))
    expiry = asyncio.create_task(_expire_periodically(servicer, settings.expire_interval_s))
    return AioRetrieverServer(server, port, health_servicer, servicer, loaded, expiry, sync, log_health,
                              metrics_server)


# ---------------------------------------------------------------- the server on its own thread


class RetrieverServer:
    """An `AioRetrieverServer` on its own event-loop thread, driven like a `grpc.Server`."""

    def __init__(self, inner: AioRetrieverServer, loop: asyncio.AbstractEventLoop, stopped: threading.Event) -> None:
        self._inner, self._loop, self._stopped = inner, loop, stopped
        self._stopping = threading.Lock()
        self._stop_called = False

    @property
    def port(self) -> int:
        return self._inner.port

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port; None when off."""
        return self._inner.metrics_port

    def stop(self, grace: float | None, drain_s: float = 0.0) -> threading.Event:
        """Stops gracefully (see AioRetrieverServer.stop); the Event is set once it has stopped."""
        with self._stopping:
            if not self._stop_called:
                self._stop_called = True
                future = asyncio.run_coroutine_threadsafe(self._inner.stop(grace, drain_s), self._loop)
                future.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self._loop.stop))
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """As grpc.Server's: True when `timeout` passed before the server stopped."""
        return not self._stopped.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the indexes are loaded; False when loading failed or `timeout` passed."""
        async def loaded() -> bool:
            return await asyncio.shield(self._inner.loaded)

        try:
            return asyncio.run_coroutine_threadsafe(loaded(), self._loop).result(timeout)
        except (TimeoutError, asyncio.CancelledError, concurrent.futures.CancelledError):
            return False


def _run_loop(loop: asyncio.AbstractEventLoop, stopped: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
        stopped.set()


def create_server(settings: RetrieverSettings, *, loader: Loader = load_indexes,
                  drafter: "Drafter | None" = None) -> tuple[RetrieverServer, int]:
    """A started server (see `start`) on a new event-loop thread and its bound port."""
    loop = new_event_loop(settings.event_loop)
    stopped = threading.Event()
    threading.Thread(target=_run_loop, args=(loop, stopped), name="retriever-aio", daemon=True).start()
    try:
        inner = asyncio.run_coroutine_threadsafe(start(settings, loader, drafter), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        stopped.wait()
        raise
    return RetrieverServer(inner, loop, stopped), inner.port


# ---------------------------------------------------------------- the process


async def serve(settings: RetrieverSettings, loader: Loader = load_indexes,
                drafter: "Drafter | None" = None) -> int:
    """Serves until SIGINT/SIGTERM (then stops with `settings.drain_s` and `grace_s`); 1 if the indexes fail to load."""
    server = await start(settings, loader, drafter)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"retriever listening on {_address(settings.host, server.port)}", flush=True)  # signals handled from here
    try:
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((server.loaded, stopping), return_when=asyncio.FIRST_COMPLETED)
        failed = server.loaded.done() and not server.loaded.result()
        if not failed:
            await stopping
            log.info("retriever stopping (drain %.2f s, grace %.1f s)", settings.drain_s, settings.grace_s)
        await server.stop(0 if failed else settings.grace_s, 0 if failed else settings.drain_s)
        stopping.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 1 if failed else 0
