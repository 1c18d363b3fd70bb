"""The retriever's configuration: one frozen `RetrieverSettings` per process.

`RetrieverSettings.from_env()` (the loader of `retriever.config`) reads every field `x` from
`SPECDRAFT_X` (the index directories from `SPECDRAFT_INDEX_DIRS`, separated by `os.pathsep`);
keyword overrides (the CLI's flags) win over the environment. Invalid values raise ValueError
with a "SPECDRAFT_X must be Y, got Z" message. The drafting limits default to `DrafterConfig`'s
(one default per setting). Narrow views for the other modules:
`drafter_config()` (the `Drafter`), `limits(vocab_size)` (request validation) and
`log_config()` (the shared output log, see docs/OUTPUT_LOG.md).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Mapping

from retriever import config
from retriever.config import boolean, integer, number, one_of
from retriever.drafting.types import ALL_SOURCES, DEFAULT_SOURCES, DrafterConfig
from retriever.logs import FORMATS
from retriever.outputlog.contract import LogConfig
from retriever.outputlog.membership import PlacementConfig

ENV_PREFIX = "SPECDRAFT_"
MAX_VOCAB_SIZE = 16_777_214  # token ids are stored as 24 bits; 0xFFFFFF is the document separator
MAX_NODES_LIMIT = 4096  # the largest max_nodes_cap a server accepts
_DRAFTER = DrafterConfig()  # the drafting limits' defaults
SESSION_MEMORY_FRACTION = 0.25
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")  # session_memory_bytes 0: this share of physical RAM


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; `vocab_size` is the effective one (never 0)."""

    default_max_nodes: int
    max_nodes_cap: int
    vocab_size: int
    max_context_tokens: int
    max_new_tokens: int
    max_batch: int


@dataclass(frozen=True)
class RetrieverSettings:
    host: str = "0.0.0.0"  # every interface (the container's port mapping needs it)
    port: int = 50051  # 0: a free port
    metrics_port: int = -1  # Prometheus GET /metrics on host:metrics_port (e.g. 9464); 0: a free port, -1: off
    indexes: tuple[str, ...] = field(default=(), metadata={"env": "INDEX_DIRS"})  # corpus datastore or FAISS store dirs
    default_max_nodes: int = 64  # a request's max_nodes 0 gets this
    max_nodes_cap: int = 64
    vocab_size: int = 0  # 0: the loaded indexes' (MAX_VOCAB_SIZE without indexes)
    max_context_tokens: int = _DRAFTER.max_context_tokens  # per session
    max_new_tokens: int = 4096  # per call
    max_batch: int = 256  # drafts per DraftBatch
    max_sessions: int = _DRAFTER.max_sessions  # beyond it the least recently used session ends
    session_memory_bytes: int = 0  # all sessions' memory; 0: SESSION_MEMORY_FRACTION of physical RAM
    tenant_max_sessions: int = _DRAFTER.tenant_max_sessions  # open sessions per tenant
    tenant_max_tokens: int = _DRAFTER.tenant_max_tokens  # context tokens of a tenant's open sessions
    max_tenants: int = _DRAFTER.max_tenants  # tenants held; beyond it the least recently used without sessions goes
    evict_idle_s: float = _DRAFTER.evict_idle_s  # a session idle this long may be evicted to make room
    session_idle_s: float = _DRAFTER.session_idle_s  # idle sessions end after this long
    tenant_token_budget: int = _DRAFTER.tenant_token_budget  # prior-output tokens kept per tenant
    reference_set: bool = False  # draft from a per-session reference set (similar prior outputs, FAISS passages)
    reflection: bool = False  # gRPC server reflection
    tokenizer: str = ""  # tokenizer dir or tokenizer.json; when set, every index must match its hash
    grace_s: float = 5.0  # graceful stop: in-flight calls get this long
    drain_s: float = 0.25  # at SIGTERM/SIGINT, new calls get UNAVAILABLE this long before the server stops
    expire_interval_s: float = 30.0  # how often idle sessions are looked for
    max_inflight: int = 256  # calls drafting at once (a DraftStream while it handles a message)
    max_queued: int = 1024  # calls waiting for a slot; beyond it RESOURCE_EXHAUSTED at once
    max_streams: int = 2048  # open DraftStreams in all (their own cap, apart from max_inflight)
    max_streams_per_peer: int = 256  # open DraftStreams per client address
    stream_idle_s: float = 60.0  # a DraftStream without a request this long is ended with its sessions
    max_queue_wait_ms: float = 5.0  # a request (with sent_unix_us) read later than this is refused; 0: off
    event_loop: str = "auto"  # auto (uvloop if installed), uvloop, asyncio (retriever.service.event_loop)
    # The shared output log (docs/OUTPUT_LOG.md): auto = Redis if redis_url is set, else the file log.
    output_log: str = "auto"  # auto, redis, file or off
    redis_url: str = field(default="", repr=False)  # redis://, rediss://, unix://, redis+cluster://h:p[,h:p] (password)
    redis_username: str = ""  # ACL user (overrides the URL's)
    redis_password: str = field(default="", repr=False)  # (overrides the URL's)
    redis_timeout_s: float = 0.5  # connect and command timeout; failures are retried in the background
    data_dir: str = "data"  # the file log lives in data_dir/log/
    log_token_budget: int = 0  # tokens kept per tenant in the log (0: tenant_token_budget)
    log_queue_max: int = 10_000  # outputs waiting to be published; beyond it the oldest drop
    log_warmup_gate: str = "not_serving"  # not_serving: health waits for the replay; degraded: it does not
    log_warmup_timeout_s: float = 0.0  # not_serving: serve anyway after this long (0: wait for the replay)
    durable_end_session: bool = False  # EndSession answers once its output is committed (file) / acknowledged (Redis)
    durable_timeout_s: float = 5.0  # durable_end_session: longest wait for that, then UNAVAILABLE (output stays queued)
    redis_wait_replicas: int = 0  # Redis: each append also waits for this many replicas (WAIT); 0: no WAIT
    redis_wait_ms: int = 100  # Redis: WAIT's timeout; fewer replicas acknowledging fails the append (retried)
    # Placement (README "Running at scale"): with Redis, replicas register and each tenant is owned by
    # tenant_owners of them (rendezvous hashing); a replica tails and drafts only the tenants it owns.
    placement: bool = True  # off: every replica tails and drafts every tenant
    replica_id: str = ""  # this replica's name in the membership (empty: random per process)
    advertise_address: str = ""  # host:port clients reach this replica at (empty: the bound host:port)
    replica_capacity: int = 1  # relative share of tenants
    tenant_owners: int = 2  # replicas owning each tenant (R)
    membership_ttl_s: float = 1.5  # a replica not heard from this long is out (its heartbeat thread's, not its loop's)
    heartbeat_s: float = 0.3  # how often a replica re-registers (TTL / 5: four heartbeats may be missed)
    # Auth and transport security (SECURITY.md); both off by default.
    auth_tokens_file: str = ""  # bearer tokens bound to tenants (retriever.credentials); empty: no auth
    tls_cert: str = ""  # PEM certificate chain; with tls_key the server speaks TLS only
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA: clients must present a certificate it signed (mTLS); needs tls_cert
    log_format: str = field(default="text", metadata={"lower": True})  # log lines: text, or JSON each (retriever.logs)

    def __post_init__(self) -> None:
        config.check(self, _RULES, ENV_PREFIX)
        if self.output_log == "redis" and not self.redis_url:
            raise ValueError(f"{env_name('redis_url')} must be set when {env_name('output_log')}=redis, got ''")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{env_name('tls_cert')} and {env_name('tls_key')} must be set together, got only "
                             f"{env_name('tls_cert' if self.tls_cert else 'tls_key')}")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"{env_name('tls_cert')} must be set when {env_name('tls_client_ca')} is (mTLS), got ''")
        if self.heartbeat_s >= self.membership_ttl_s:
            raise ValueError(f"{env_name('heartbeat_s')} must be less than {env_name('membership_ttl_s')}="
                             f"{self.membership_ttl_s}, got {self.heartbeat_s}")
        if self.default_max_nodes > self.max_nodes_cap:
            raise ValueError(f"{env_name('default_max_nodes')} must be at most {env_name('max_nodes_cap')}="
                             f"{self.max_nodes_cap}, got {self.default_max_nodes}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "RetrieverSettings":
        """Defaults <- SPECDRAFT_* variables <- overrides (None values are ignored)."""
        return config.load(cls, ENV_PREFIX, environ, **overrides)

    def replace(self, **changes: object) -> "RetrieverSettings":
        return config.replace(self, **changes)

    def drafter_config(self) -> DrafterConfig:
        return DrafterConfig(max_sessions=self.max_sessions, session_idle_s=self.session_idle_s,
                             session_memory_bytes=self.session_memory_bytes or default_session_memory_bytes(),
                             tenant_max_sessions=self.tenant_max_sessions, tenant_max_tokens=self.tenant_max_tokens,
                             max_tenants=self.max_tenants, evict_idle_s=self.evict_idle_s,
                             tenant_token_budget=self.tenant_token_budget,
                             max_context_tokens=self.max_context_tokens,
                             sources=ALL_SOURCES if self.reference_set else DEFAULT_SOURCES)

    def log_config(self) -> LogConfig | None:
        """The output log's configuration; None when `output_log` is off."""
        if self.output_log == "off":
            return None
        url = self.redis_url if self.output_log in ("auto", "redis") else ""
        return LogConfig(redis_url=url, redis_username=self.redis_username, redis_password=self.redis_password,
                         timeout_s=self.redis_timeout_s, data_dir=self.data_dir,
                         token_budget=self.log_token_budget or self.tenant_token_budget,
                         queue_max=self.log_queue_max, durable=self.durable_end_session,
                         wait_replicas=self.redis_wait_replicas, wait_ms=self.redis_wait_ms)

    def placement_config(self, replica_id: str, bound_port: int) -> "PlacementConfig | None":
        """This replica's placement; None when off or without Redis (one replica: owns every tenant)."""
        log = self.log_config()
        if not self.placement or log is None or not log.redis_url:
            return None
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        address = self.advertise_address or f"{host}:{bound_port}"
        return PlacementConfig(replica_id, address, self.membership_ttl_s, self.heartbeat_s, self.replica_capacity,
                               self.tenant_owners)

    def limits(self, index_vocab_size: int = 0) -> Limits:
        """The request limits; vocab: the setting, else `index_vocab_size`, else MAX_VOCAB_SIZE."""
        vocab = self.vocab_size or index_vocab_size or MAX_VOCAB_SIZE
        return Limits(self.default_max_nodes, self.max_nodes_cap, vocab, self.max_context_tokens,
                      self.max_new_tokens, self.max_batch)


def default_session_memory_bytes() -> int:
    """SESSION_MEMORY_FRACTION of the machine's physical memory (os.sysconf); 1 GiB where unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 0
    return int(physical * SESSION_MEMORY_FRACTION) if physical > 0 else 1 << 30


def env_name(field_name: str) -> str:
    """The environment variable of a field, e.g. `indexes` -> SPECDRAFT_INDEX_DIRS."""
    return config.env_name(RetrieverSettings, ENV_PREFIX, field_name)


_RULES: dict[str, config.Rule] = {
    "host": (lambda v: isinstance(v, str) and bool(v), "a non-empty host name or address"),
    "port": (integer(0, 65535), "an integer in [0, 65535]"),
    "metrics_port": (integer(-1, 65535), "an integer in [-1, 65535] (0: a free port, -1: off)"),
    "indexes": (lambda v: isinstance(v, tuple) and all(isinstance(p, str) and p for p in v),
                "a tuple of non-empty directory paths"),
    "default_max_nodes": (integer(1), "an integer >= 1"),
    "max_nodes_cap": (integer(1, MAX_NODES_LIMIT), f"an integer in [1, {MAX_NODES_LIMIT}]"),
    "vocab_size": (integer(0, MAX_VOCAB_SIZE), f"an integer in [0, {MAX_VOCAB_SIZE}] (0: the indexes')"),
    "max_context_tokens": (integer(1), "an integer >= 1"),
    "max_new_tokens": (integer(1), "an integer >= 1"),
    "max_batch": (integer(1), "an integer >= 1"),
    "max_sessions": (integer(1), "an integer >= 1"),
    "session_idle_s": (number(0, False), "a finite number of seconds > 0"),
    "session_memory_bytes": (integer(0), "an integer >= 0 (0: a quarter of physical memory)"),
    "tenant_max_sessions": (integer(1), "an integer >= 1"),
    "tenant_max_tokens": (integer(1), "an integer >= 1"),
    "max_tenants": (integer(1), "an integer >= 1"),
    "evict_idle_s": (number(0, True), "a finite number of seconds >= 0"),
    "max_streams": (integer(1), "an integer >= 1"),
    "max_streams_per_peer": (integer(1), "an integer >= 1"),
    "stream_idle_s": (number(0, False), "a finite number of seconds > 0"),
    "tenant_token_budget": (integer(1), "an integer >= 1"),
    "reflection": (boolean, "a boolean"),
    "reference_set": (boolean, "a boolean"),
    "tokenizer": (lambda v: isinstance(v, str), "a path or empty"),
    "grace_s": (number(0, True), "a finite number of seconds >= 0"),
    "drain_s": (number(0, True), "a finite number of seconds >= 0"),
    "expire_interval_s": (number(0, False), "a finite number of seconds > 0"),
    "max_inflight": (integer(1), "an integer >= 1"),
    "max_queued": (integer(0), "an integer >= 0"),
    "max_queue_wait_ms": (number(0, True), "a finite number of milliseconds >= 0 (0: off)"),
    "event_loop": one_of("auto", "uvloop", "asyncio"),
    "output_log": one_of("auto", "redis", "file", "off"),
    "redis_url": (lambda v: isinstance(v, str) and (not v or v.split("://", 1)[0] in REDIS_SCHEMES),
                  "empty or a redis://, rediss://, unix:// or redis+cluster://host:port[,host:port...] URL"),
    "redis_username": (lambda v: isinstance(v, str), "a string"),
    "redis_password": (lambda v: isinstance(v, str), "a string"),
    "redis_timeout_s": (number(0, False), "a finite number of seconds > 0"),
    "data_dir": (lambda v: isinstance(v, str) and bool(v), "a non-empty directory path"),
    "log_token_budget": (integer(0), "an integer >= 0 (0: tenant_token_budget)"),
    "log_queue_max": (integer(1), "an integer >= 1"),
    "log_warmup_gate": (lambda v: v in ("not_serving", "degraded"), "not_serving or degraded"),
    "log_warmup_timeout_s": (number(0, True), "a finite number of seconds >= 0 (0: no limit)"),
    "durable_end_session": (boolean, "a boolean"),
    "durable_timeout_s": (number(0, False), "a finite number of seconds > 0"),
    "redis_wait_replicas": (integer(0), "an integer >= 0 (0: no WAIT)"),
    "redis_wait_ms": (integer(1), "an integer number of milliseconds >= 1"),
    "placement": (boolean, "a boolean"),
    "replica_id": (lambda v: isinstance(v, str) and len(v) <= 128 and "\0" not in v, "at most 128 characters"),
    "advertise_address": (lambda v: isinstance(v, str) and (not v or ":" in v), "empty or host:port"),
    "replica_capacity": (integer(1), "an integer >= 1"),
    "tenant_owners": (integer(1), "an integer >= 1"),
    "membership_ttl_s": (number(0, False), "a finite number of seconds > 0"),
    "heartbeat_s": (number(0, False), "a finite number of seconds > 0"),
    "auth_tokens_file": (lambda v: isinstance(v, str), "a file path or empty (auth off)"),
    "tls_cert": (lambda v: isinstance(v, str), "a PEM file path or empty (plaintext)"),
    "tls_key": (lambda v: isinstance(v, str), "a PEM file path or empty"),
    "tls_client_ca": (lambda v: isinstance(v, str), "a PEM file path or empty (no client certificates)"),
    "log_format": one_of(*FORMATS),
}
