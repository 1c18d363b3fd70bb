"""The shared output log: the contract both stores keep, and the non-blocking publish queue.

A log holds, per tenant, the finished session outputs of every replica, oldest first,
trimmed to a per-tenant token budget. Stores: `retriever.outputlog.redis_log.RedisLog` (Redis
Streams, shared by replicas) and `retriever.outputlog.file_log.FileLog` (SQLite in a data dir,
one machine). `retriever.outputlog.sync.LogSync` replays and tails a log into a `Drafter`.

Contract (`OutputLog`, every method async, raising `LogUnavailable` when the store
cannot be reached or times out, never blocking the event loop):
- `append(batch)`: adds each `PendingOutput` to its tenant's log, idempotently: an
  output already appended (same origin and seq, e.g. a retry after a lost reply) is not
  added again. Then trims the tenant's oldest entries while the tenant holds more than
  `token_budget` tokens (the newest entry always stays).
- `read(cursors, count, block_ms) -> LogRead`: for each tenant in `cursors` (tenant ->
  cursor, `START` for the beginning), at most `count` entries after the cursor, oldest
  first, and the advanced cursors (pass them to the next read; a store may advance a
  cursor past ids of other tenants); waits up to `block_ms` for one entry when there is
  none (0: no wait).
- `tenants()`: every tenant with a log; `size()`: totals; `close()`.

Security property: an entry is read back under the tenant of the log it was appended to
(the key or row, never a field inside the entry), and every key, row and index is per
tenant, so one tenant's outputs never draft for another.

Tokens travel as int32 little-endian bytes (4 bytes per token).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from retriever.errors import Unavailable

log = logging.getLogger(__name__)

START = "0"  # the cursor before a tenant's first entry, in both stores
TOKEN_DTYPE = np.dtype("<i4")  # stored token format: int32 little-endian


class LogUnavailable(Unavailable):
    """The log store cannot be reached, timed out or refused a command."""


def encode_tokens(tokens: np.ndarray) -> bytes:
    """int32 [k] -> 4k bytes, little-endian."""
    return np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()


def decode_tokens(payload: bytes) -> np.ndarray:
    """4k bytes, little-endian -> int32 [k] (native order, writable)."""
    if len(payload) % 4:
        raise ValueError(f"token payload must be a multiple of 4 bytes, got {len(payload)}")
    return np.frombuffer(payload, TOKEN_DTYPE).astype(np.int32)


@dataclass(frozen=True)
class PendingOutput:
    """One finished output on its way into the log."""

    tenant: str
    payload: bytes  # int32 little-endian tokens, 4 * num_tokens bytes
    origin: str  # replica id of the publisher
    seq: int  # increasing per origin: with origin, the idempotency key of the append
    enqueued_s: float  # time.monotonic() when queued

    @property
    def num_tokens(self) -> int:
        return len(self.payload) // 4


@dataclass(frozen=True)
class LogEntry:
    """One output read back from the log."""

    tenant: str  # the log it was read from
    entry_id: str  # increasing within the tenant's log; a cursor for `read`
    origin: str  # replica id of the publisher
    tokens: np.ndarray  # [k] int32


@dataclass(frozen=True)
class LogRead:
    entries: tuple[LogEntry, ...]  # per tenant oldest first
    cursors: dict[str, str]  # tenant -> cursor after these entries (every tenant asked for)


@dataclass(frozen=True)
class LogSize:
    tenants: int
    entries: int
    tokens: int


@dataclass(frozen=True)
class LogConfig:
    """How to reach and bound the log; `redis_url` empty: the file store under `data_dir`."""

    redis_url: str = field(default="", repr=False)  # redis://host:port/db, rediss://, unix:///path.sock
    redis_username: str = ""  # ACL user (overrides the URL's)
    redis_password: str = field(default="", repr=False)  # (overrides the URL's); never logged
    timeout_s: float = 0.5  # connect and command timeout (a blocking read adds block_ms)
    data_dir: str = "data"  # the file store lives in data_dir/log/
    token_budget: int = 2_000_000  # per tenant, as the drafter's tenant_token_budget
    queue_max: int = 10_000  # outputs waiting to be published; beyond it the oldest drop
    batch_max: int = 256  # outputs per append round trip
    block_ms: int = 250  # tailing: longest wait of one read
    read_count: int = 512  # entries per tenant per read
    discover_s: float = 0.25  # tailing: how often new tenants are looked for
    backoff_min_s: float = 0.05
    backoff_max_s: float = 2.0
    dedup_ttl_s: int = 7 * 86400  # Redis: how long a quiet tenant's idempotency keys live
    durable: bool = False  # file: every commit fsynced (synchronous=FULL), not only kill-9 safe
    wait_replicas: int = 0  # Redis: each append also WAITs for this many replicas (0: no WAIT)
    wait_ms: int = 100  # Redis: WAIT's timeout; fewer replicas acknowledging fails the append

    def __post_init__(self) -> None:
        for name in ("timeout_s", "discover_s", "backoff_min_s", "backoff_max_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"LogConfig.{name} must be a number of seconds > 0, got {value!r}")
        for name in ("token_budget", "queue_max", "batch_max", "read_count", "dedup_ttl_s"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"LogConfig.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.wait_replicas, int) and self.wait_replicas >= 0 and isinstance(self.wait_ms, int)
                and self.wait_ms >= 1):
            raise ValueError(f"LogConfig.wait_replicas must be >= 0 and wait_ms >= 1, got {self.wait_replicas!r} "
                             f"and {self.wait_ms!r}")
        if not (isinstance(self.block_ms, int) and self.block_ms >= 0):
            raise ValueError(f"LogConfig.block_ms must be an integer >= 0, got {self.block_ms!r}")


class OutputLog(Protocol):
    """See the module docstring for the contract."""

    name: str  # "redis" or "file"

    async def append(self, batch: Sequence[PendingOutput]) -> None: ...

    async def read(self, cursors: dict[str, str], count: int, block_ms: int) -> LogRead: ...

    async def tenants(self) -> list[str]: ...

    async def size(self) -> LogSize: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class PublishHealth:
    """The publish side: what waits, what was lost, whether the last round trip worked."""

    connected: bool  # the last append (or the first, not yet tried: True) succeeded
    queued: int  # outputs waiting (in flight included)
    published: int  # outputs appended
    dropped: int  # outputs dropped because the queue was full
    errors: int  # failed append round trips
    oldest_queued_s: float  # age of the oldest waiting output (0: none)
    last_error: str


class PublishQueue:
    """A bounded FIFO of one replica's outputs drained into a log by a background task.

    `put` never blocks (any thread; it numbers the output with the next seq of `origin`;
    the oldest output drops when full, counted); `run`
    appends batches in order, retrying a failed batch with exponential backoff (jittered,
    `backoff_min_s` doubling to `backoff_max_s`). Retries are safe: appends are idempotent.
    `wait_published(seq, timeout_s)` (on the loop of `run`) returns once the output numbered
    `seq` (`last_seq` after its `put`) is appended: a durable EndSession.
    """

    def __init__(self, log: OutputLog, config: LogConfig, origin: str) -> None:
        self._log, self._config, self.origin = log, config, origin
        self._items: deque[PendingOutput] = deque()
        self._lock = threading.Lock()  # put may come from another thread
        self._seq = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected, self._published, self._dropped, self._errors = True, 0, 0, 0
        self._last_error = ""
        self._published_seq = self._dropped_seq = 0  # highest seq appended / dropped (seqs go in order)
        self._progress: asyncio.Condition | None = None  # on the loop of `run`: waiters of wait_published

    def put(self, tenant: str, tokens: np.ndarray) -> None:
        """Queues `tokens` (int32 [k], copied) as an output of `tenant`."""
        payload = encode_tokens(tokens)
        with self._lock:
            self._seq += 1
            while len(self._items) >= self._config.queue_max:
                self._dropped_seq = self._items.popleft().seq
                self._dropped += 1
            self._items.append(PendingOutput(tenant, payload, self.origin, self._seq, time.monotonic()))
        loop = self._loop
        if loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            try:
                if running is loop:
                    self._wake.set()
                else:
                    loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed: the output stays queued, never raised to the drafter
                pass

    @property
    def last_seq(self) -> int:
        """The seq of the latest output `put` (0: none yet)."""
        return self._seq

    async def wait_published(self, seq: int, timeout_s: float) -> None:
        """Returns once output `seq` is appended; LogUnavailable when it was dropped (queue full)
        or `timeout_s` passed first (it then stays queued and may still be appended)."""
        if self._progress is None:
            self._progress = asyncio.Condition()
        try:
            async with self._progress:
                await asyncio.wait_for(self._progress.wait_for(
                    lambda: self._published_seq >= seq or self._dropped_seq >= seq), timeout_s)
        except asyncio.TimeoutError:
            raise LogUnavailable(f"output log {self._log.name} must append the output within {timeout_s:g} s, got "
                                 f"{self._last_error or 'no append yet'} (the output stays queued)") from None
        if self._published_seq < seq:
            raise LogUnavailable(f"output log {self._log.name} must take the output, got it dropped: "
                                 f"{self._config.queue_max} outputs were waiting")

    async def _notify(self) -> None:
        if self._progress is not None:
            async with self._progress:
                self._progress.notify_all()

    def health(self) -> PublishHealth:
        with self._lock:
            oldest = time.monotonic() - self._items[0].enqueued_s if self._items else 0.0
        return PublishHealth(self._connected, len(self._items), self._published, self._dropped,
                             self._errors, oldest, self._last_error)

    async def run(self) -> None:
        """Drains forever (cancel to stop)."""
        self._loop = asyncio.get_running_loop()
        delay = self._config.backoff_min_s
        while True:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
                continue
            if await self.flush_once():
                delay = self._config.backoff_min_s
            else:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._config.backoff_max_s)

    async def flush_once(self) -> bool:
        """Appends the oldest batch; False (counted, logged) when the log failed."""
        with self._lock:
            batch = [self._items[i] for i in range(min(len(self._items), self._config.batch_max))]
        if not batch:
            return True
        try:
            await self._log.append(batch)
        except Exception as e:  # noqa: BLE001 - any store failure: retried after a backoff
            self._errors += 1
            self._last_error = f"{type(e).__name__}: {e}"
            if self._connected:
                log.warning("output log %s unavailable, %d outputs queued: %s", self._log.name,
                            len(self._items), self._last_error)
            self._connected = False
            return False
        if not self._connected:
            log.info("output log %s reachable again", self._log.name)
        self._connected = True
        last = batch[-1].seq
        with self._lock:
            while self._items and self._items[0].seq <= last:  # some may have dropped meanwhile
                self._items.popleft()
            self._published_seq = max(self._published_seq, last)
        self._published += len(batch)
        await self._notify()
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Tries to publish everything queued within `timeout_s` (e.g. at shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._items and time.monotonic() < deadline:
            if not await self.flush_once():
                await asyncio.sleep(min(self._config.backoff_min_s, max(0.0, deadline - time.monotonic())))
        return not self._items
