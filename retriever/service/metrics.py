"""Prometheus metrics of the retriever (`specdraft_retriever_*`) and their `/metrics` endpoint.

- `RetrieverMetrics.create(registry=None)`: the instruments, in a registry of their own (not the
  process-global default, so one process can hold several servers). The service calls
  `drafted` / `draft_failed` / `rejected` / `ended` (sessions ended, by reason), the auth guard
  `auth_denied`.
  A draft's own figures (drafts, duration, nodes, new tokens, starts) go to a plain-number
  tally exposed at scrape time (`_DraftTally`): the hot path makes no prometheus_client call.
- `watch(stats, ready, log_health)`: gauges read at scrape time (sessions, tenants, output
  log lag and errors). Not thread-safe like the Drafter: scrape on the server's event loop,
  which `serve_metrics` does.
- `serve_metrics(registry, host, port)`: a minimal HTTP/1.0 `GET /metrics` server on the
  running loop (port 0: a free one). Nothing of a request's contents is ever recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from retriever.drafting.types import DrafterStats
    from retriever.outputlog.sync import SyncHealth
    from retriever.store.datastore import CorpusDatastore
    from retriever.store.faiss_store import FaissStore

log = logging.getLogger(__name__)
PREFIX = "specdraft_retriever_"
RPCS = ("draft", "stream", "batch")  # Draft, DraftStream, DraftBatch items
AUTH_RPCS = ("Draft", "DraftStream", "DraftBatch", "EndSession", "Describe")  # auth_denials' rpc label values
DRAFT_SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)
LOOKUP_SECONDS_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)
LOOKUP_SAMPLE_EVERY = 16  # drafts per sampled lookup breakdown (observing ~6 children costs ~5 us)
_INDEX = re.compile(r"\[\d*\]")
_REASON = re.compile(r"[a-z_][a-z0-9_.]{0,47}")


def rejection_reason(code: str, message: str) -> str:
    """The label of a rejection: for INVALID_ARGUMENT the field its "X must be Y" message names
    (indexes dropped: `prompt[3]` -> `prompt`), else the status code in lower case."""
    if code == "INVALID_ARGUMENT" and " must " in message:
        field = _INDEX.sub("", message.split(" must ", 1)[0]).replace(" ", "_").lower()
        return field if _REASON.fullmatch(field) else "other"
    return code.lower()


class _DraftTally(Collector):
    """Per-draft figures as plain numbers, exposed when scraped: drafts{rpc,code},
    draft_duration_seconds{rpc}, draft_nodes{rpc}, new_tokens{rpc}, session_starts{rpc}.
    Updated on the server's loop; a scrape from another thread reads copies."""

    def __init__(self) -> None:
        self.codes: dict[tuple[str, str], int] = {(rpc, "OK"): 0 for rpc in RPCS}  # (rpc, code) -> drafts
        self.buckets = {rpc: [0] * (len(DRAFT_SECONDS_BUCKETS) + 1) for rpc in RPCS}  # per bucket, +Inf last
        self.seconds = dict.fromkeys(RPCS, 0.0)
        self.sums = {rpc: [0, 0, 0] for rpc in RPCS}  # nodes, new tokens, starts

    def ok(self, rpc: str, seconds: float, nodes: int, new_tokens: int, started: bool) -> None:
        self.codes[(rpc, "OK")] += 1
        self.buckets[rpc][bisect_left(DRAFT_SECONDS_BUCKETS, seconds)] += 1  # le: v <= bound
        self.seconds[rpc] += seconds
        sums = self.sums[rpc]
        sums[0] += nodes
        sums[1] += new_tokens
        sums[2] += started

    def failed(self, rpc: str, code: str) -> None:
        self.codes[(rpc, code)] = self.codes.get((rpc, code), 0) + 1

    def collect(self) -> Iterator[Metric]:
        drafts = CounterMetricFamily(PREFIX + "drafts", "Drafts answered, by RPC and gRPC status code (batch: per "
                                     "item).", labels=["rpc", "code"])
        for (rpc, code), n in self.codes.copy().items():
            drafts.add_metric([rpc, code], n)
        yield drafts
        hist = HistogramMetricFamily(PREFIX + "draft_duration_seconds", "Time to validate, draft and encode one "
                                     "successful draft in the service (no network).", labels=["rpc"])
        bounds = [floatToGoString(b) for b in DRAFT_SECONDS_BUCKETS] + ["+Inf"]
        for rpc in RPCS:
            hist.add_metric([rpc], list(zip(bounds, itertools.accumulate(self.buckets[rpc].copy()))),
                            sum_value=self.seconds[rpc])
        yield hist
        for i, (name, doc) in enumerate((
                ("draft_nodes", "Draft tree nodes (draft tokens) returned."),
                ("new_tokens", "Tokens clients reported as accepted since their previous draft (new_tokens: "
                 "accepted draft tokens plus bonus tokens)."),
                ("session_starts", "Drafts that (re)started a session with a prompt."))):
            family = CounterMetricFamily(PREFIX + name, doc, labels=["rpc"])
            for rpc in RPCS:
                family.add_metric([rpc], self.sums[rpc][i])
            yield family


@dataclass(frozen=True)
class RetrieverMetrics:
    """The retriever's instruments (see the README's metrics table)."""

    registry: CollectorRegistry
    tally: _DraftTally  # drafts, draft_duration_seconds, draft_nodes, new_tokens, session_starts
    rejections: Counter  # rpc, code, reason
    sessions_ended: Counter  # reason
    index_tokens: Gauge  # index
    lookup_seconds: Histogram  # source: context, tenant, reference, corpus:NAME, build_tree
    auth_denials: Counter  # rpc (a method name of AUTH_RPCS), code (UNAUTHENTICATED, PERMISSION_DENIED)

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> "RetrieverMetrics":
        r = registry if registry is not None else CollectorRegistry()
        tally = _DraftTally()
        r.register(tally)
        return cls(
            r, tally,
            Counter(PREFIX + "rejections", "Calls or batch items refused, by RPC, status code and reason (the "
                    "invalid field, or the code).", ["rpc", "code", "reason"], registry=r),
            Counter(PREFIX + "sessions_ended", "Sessions ended: end_session (EndSession), idle (expiry), "
                    "cancelled (a cancelled DraftStream) or shutdown (open at a graceful stop).", ["reason"],
                    registry=r),
            Gauge(PREFIX + "index_tokens", "Tokens of each loaded corpus datastore.", ["index"], registry=r),
            Histogram(PREFIX + "index_lookup_seconds", "Time of each index query inside a draft (context, tenant, "
                      "reference, corpus:NAME) and of the tree build; one draft in LOOKUP_SAMPLE_EVERY is sampled.",
                      ["source"], registry=r, buckets=LOOKUP_SECONDS_BUCKETS),
            Counter(PREFIX + "auth_denials", "Calls refused by auth (a tokens file is set), by RPC method and "
                    "status code (UNAUTHENTICATED, PERMISSION_DENIED); never by token or tenant.", ["rpc", "code"],
                    registry=r))

    def drafted(self, rpc: str, seconds: float, nodes: int, new_tokens: int, started: bool) -> None:
        """One successful draft of `rpc` (one of RPCS)."""
        self.tally.ok(rpc, seconds, nodes, new_tokens, started)

    def looked_up(self, lookups: "tuple[tuple[str, float], ...]") -> None:
        """One sampled draft's (source, seconds) per index query and the tree build."""
        for source, seconds in lookups:
            self.lookup_seconds.labels(source).observe(seconds)

    def draft_failed(self, rpc: str, code: str, message: str) -> None:
        """One failed draft of `rpc`: counted in drafts{code} and in rejections."""
        self.tally.failed(rpc, code)
        self.rejected(rpc, code, message)

    def rejected(self, rpc: str, code: str, message: str) -> None:
        self.rejections.labels(rpc, code, rejection_reason(code, message)).inc()

    def auth_denied(self, rpc: str, code: str) -> None:
        """One call refused by auth; `rpc` outside AUTH_RPCS is counted as "other" (bounded labels)."""
        self.auth_denials.labels(rpc if rpc in AUTH_RPCS else "other", code).inc()

    def ended(self, reason: str, sessions: int = 1) -> None:
        if sessions:
            self.sessions_ended.labels(reason).inc(sessions)

    def set_indexes(self, corpora: Sequence["CorpusDatastore | FaissStore"]) -> None:
        for corpus in corpora:
            self.index_tokens.labels(corpus.manifest.name).set(corpus.manifest.num_tokens)

    def watch(self, stats: Callable[[], "DrafterStats"], ready: Callable[[], bool],
              log_health: Callable[[], "SyncHealth"] | None = None) -> None:
        """Registers the gauges read at scrape time (call once per registry)."""
        self.registry.register(_StateCollector(stats, ready, log_health))


class _StateCollector(Collector):
    """Drafter and output-log state, read when scraped (on the server's loop)."""

    def __init__(self, stats: Callable[[], "DrafterStats"], ready: Callable[[], bool],
                 log_health: Callable[[], "SyncHealth"] | None) -> None:
        self._stats, self._ready, self._log_health = stats, ready, log_health

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily(PREFIX + "ready", "1 once the indexes are loaded (health SERVING).",
                                value=float(self._ready()))
        yield GaugeMetricFamily(PREFIX + "sessions", "Sessions held (active generations).", value=s.sessions)
        yield GaugeMetricFamily(PREFIX + "tenants", "Tenants with prior outputs indexed.", value=s.tenants)
        yield GaugeMetricFamily(PREFIX + "tenant_tokens", "Prior-output tokens in the tenant indexes.",
                                value=s.tenant_tokens)
        yield GaugeMetricFamily(PREFIX + "online_index_bytes", "Memory of the online indexes (sessions and "
                                "tenants).", value=s.memory_bytes)
        yield GaugeMetricFamily(PREFIX + "session_memory_bytes", "Memory of the open sessions (bounded by "
                                "SPECDRAFT_SESSION_MEMORY_BYTES).", value=s.session_bytes)
        yield CounterMetricFamily(PREFIX + "sessions_evicted", "Idle sessions evicted to make room under the "
                                  "session memory budget and the tenant quotas.", value=s.evicted)
        if self._log_health is not None:
            yield from _log_families(self._log_health())


def _log_families(h: "SyncHealth") -> Iterator[Metric]:
    """The output log's families, labelled by backend (redis or file)."""
    p = PREFIX + "output_log_"

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(p + name, doc, labels=["backend"])
        family.add_metric([h.backend], value)
        return family

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(p + name, doc, labels=["backend"])
        family.add_metric([h.backend], value)
        return family

    yield gauge("warm", "1 once the log's replay is done (tailing).", float(h.warm))
    yield gauge("reading", "1 while the last read of the log succeeded.", float(h.reading))
    yield gauge("since_read_seconds", "Seconds since the last successful read (bounds the tailing lag).",
                h.since_read_s)
    yield gauge("queued_outputs", "Outputs waiting to be published.", h.publish.queued)
    yield gauge("oldest_queued_seconds", "Age of the oldest output waiting to be published.",
                h.publish.oldest_queued_s)
    yield counter("read_errors", "Failed reads of the log (Redis or file store errors).", h.read_errors)
    yield counter("publish_errors", "Failed append round trips (Redis or file store errors).", h.publish.errors)
    yield counter("published_outputs", "Outputs of this replica appended to the log.", h.publish.published)
    yield counter("dropped_outputs", "Outputs dropped because the publish queue was full.", h.publish.dropped)
    yield counter("applied_outputs", "Outputs of other replicas inserted into the tenant indexes.",
                  h.applied_entries)
    yield counter("applied_tokens", "Tokens of other replicas' outputs inserted.", h.applied_tokens)
    yield counter("rejected_entries", "Log entries the index refused (corrupt or foreign).", h.rejected)


# ---------------------------------------------------------------- the endpoint


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Serves `GET /metrics` on the running loop; OSError (with the address) when it cannot bind."""
    try:
        return await asyncio.start_server(lambda r, w: _handle(registry, r, w), host, port)
    except OSError as e:
        raise OSError(f"retriever metrics address must be bindable, got {host}:{port} ({e.strerror or e})") from None


def bound_port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


def _response(registry: CollectorRegistry, method: bytes, target: bytes) -> tuple[bytes, bytes, bytes]:
    """(status, content type, body) of one request."""
    if method not in (b"GET", b"HEAD"):
        return b"405 Method Not Allowed", b"text/plain", b"method must be GET, got another\n"
    if target.split(b"?", 1)[0] != b"/metrics":
        return b"404 Not Found", b"text/plain", b"path must be /metrics\n"
    try:
        return b"200 OK", CONTENT_TYPE_LATEST.encode(), generate_latest(registry)
    except Exception:  # noqa: BLE001 - a failed scrape never reaches the loop
        log.exception("metrics scrape failed")
        return b"500 Internal Server Error", b"text/plain", b"scrape failed, see the retriever's log\n"


async def _handle(registry: CollectorRegistry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        method, target = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
        status, kind, body = _response(registry, method, target)
        writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                     + (body if method != b"HEAD" else b""))
        await writer.drain()
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()
