"""`LogSync`: keeps a `Drafter`'s tenant indexes in step with the shared output log.

    sync = LogSync(open_log(config), config)            # replica_id: random per process
    drafter = Drafter(drafter_config, corpora, on_output=sync.publish)
    await sync.start(drafter)                           # warm-up (replay), then tail; publish
    await sync.wait_warm(timeout_s)                     # e.g. before health SERVING
    ...
    await sync.published(timeout_s)                     # a durable EndSession: its output is in the log
    await sync.stop(flush_s=1.0)

- Warm-up replays the whole log (every tenant, oldest first) into the drafter with
  `add_prior_outputs` (a tenant's entries of one read in calls of ~APPLY_CHUNK_TOKENS), in
  slices of at most `APPLY_SLICE_S` of loop time (drafts keep flowing meanwhile), then tails
  it: blocking reads of `block_ms`, new tenants looked for every `discover_s`.
- Entries whose origin is this replica's id are skipped: the drafter inserted them when
  their session ended. The id is random per process, so a restarted replica replays its
  own earlier outputs exactly once.
- `publish(tenant, tokens)` never blocks (a bounded `PublishQueue`; any thread). Store
  failures never reach the drafter: they are counted in `health()` and retried with backoff.
- Every drafter call happens on the loop that ran `start` (the Drafter is not thread-safe).
- With a `Placement` (`retriever.outputlog.membership`: several replicas sharing tenants), only
  the tenants this replica owns are tailed; a tenant it comes to own is replayed from the start
  (`ready(tenant)` is False meanwhile: the servicer sends its sessions elsewhere; WARM_PER_READ
  tenants start per read, each ready as soon as its own replay is in), and a tenant it
  no longer owns stops being tailed and its index is freed (`Drafter.drop_tenant`). Tailing starts
  once the member list held still for a TTL (`Placement.listed`: replicas started together see each
  other first; warming every tenant first would spike memory). A change of the
  members is acted on at the next read (not after `discover_s`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from retriever.outputlog.contract import (
    START,
    LogConfig,
    LogEntry,
    LogUnavailable,
    OutputLog,
    PublishHealth,
    PublishQueue,
)

if TYPE_CHECKING:
    from retriever.drafting.drafter import Drafter
    from retriever.outputlog.membership import Placement

log = logging.getLogger(__name__)
APPLY_SLICE_S = 0.002  # longest stretch of index inserts before yielding to the loop
RESERVE_MIN_TOKENS = 1024  # a replayed tenant's index is sized at once for at least this many new tokens
APPLY_CHUNK_TOKENS = 8192  # tokens per index insert call at most (plus one output): bounds a loop stall
WARM_PER_READ = 32  # newly owned tenants whose replay one read starts (each serves once its own is in)


async def cancel_until_done(tasks: list["asyncio.Task[None]"], timeout_s: float = 5.0) -> None:
    """Cancels `tasks` again until they end: on Python 3.11 `asyncio.wait_for` (which redis-py
    uses to send commands) loses a cancellation that races with the send completing."""
    loop = asyncio.get_running_loop()
    pending, deadline = {t for t in tasks if not t.done()}, loop.time() + timeout_s
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)
    if pending:
        log.error("output log: %d tasks did not stop within %.1f s", len(pending), timeout_s)


def open_log(config: LogConfig) -> OutputLog:
    """`RedisLog` when `config.redis_url` is set, else the embedded `FileLog` under `config.data_dir`."""
    if config.redis_url:
        from retriever.outputlog.redis_log import RedisLog

        return RedisLog(config)
    from retriever.outputlog.file_log import FileLog

    return FileLog(config)


@dataclass(frozen=True)
class SyncHealth:
    """One replica's view of the log (for health, metrics and the warm-up gate)."""

    backend: str  # "redis" or "file"
    replica_id: str
    warm: bool  # the replay is done (tailing)
    warmup_entries: int  # outputs replayed into the indexes so far
    warmup_tokens: int
    warmup_total_tokens: int  # the log's size when the replay began (0: not known yet)
    warmup_s: float  # replay time so far, or its total once warm
    reading: bool  # the last read of the log succeeded
    read_errors: int
    since_read_s: float  # since the last successful read (bounds the tailing lag)
    tenants: int  # tenants being tailed
    applied_entries: int  # outputs of other replicas inserted, warm-up included
    applied_tokens: int
    skipped_own: int  # entries of this replica, already inserted locally
    rejected: int  # entries the index refused (e.g. negative token ids), logged and skipped
    publish: PublishHealth
    warming_tenants: int = 0  # newly owned tenants being replayed (placement)
    dropped_tenants: int = 0  # tenants whose index was freed because another replica owns them now

    @property
    def degraded(self) -> bool:
        """Not warm, or the log cannot be read or written right now."""
        return not (self.warm and self.reading and self.publish.connected)


class LogSync:
    """Replays, tails and publishes one replica's outputs; see the module docstring."""

    def __init__(self, log: OutputLog, config: LogConfig, replica_id: str | None = None,
                 placement: "Placement | None" = None) -> None:
        self.log, self._config, self.placement = log, config, placement
        self.replica_id = placement.me.replica_id if placement is not None else replica_id or secrets.token_hex(8)
        self._known: set[str] = set()  # the log's tenants at the last discovery
        self._warming: set[str] = set()  # owned tenants being replayed
        self._dropped = 0
        self._queue = PublishQueue(log, config, self.replica_id)
        self._tasks: list[asyncio.Task[None]] = []
        self._warm = asyncio.Event()
        self._started_s = self._warm_s = 0.0
        self._warmup = [0, 0, 0]  # entries, tokens, total tokens (the log's size when the replay began)
        self._sized, self._stopped = False, False
        self._applied = [0, 0, 0, 0]  # entries, tokens, skipped own, rejected
        self._reading, self._read_errors, self._last_read_s, self._tenants = True, 0, 0.0, 0
        self._cursors: dict[str, str] = {}  # tailed tenant -> cursor
        self._handover = (0.0, 0)  # when the current warming of newly owned tenants began, and how many

    def publish(self, tenant: str, tokens: np.ndarray) -> None:
        """Queues a finished output (int32 [k]) for the log; the `Drafter`'s `on_output`."""
        self._queue.put(tenant, tokens)

    async def published(self, timeout_s: float) -> None:
        """Returns once every output published so far is in the log (file: committed; Redis:
        acknowledged, by `wait_replicas` replicas too when set); raises LogUnavailable (an
        Unavailable) after `timeout_s` or when one was dropped. On the loop that ran `start`."""
        await self._queue.wait_published(self._queue.last_seq, timeout_s)

    async def start(self, drafter: "Drafter") -> None:
        """Starts the replay-then-tail and the publish tasks on the running loop."""
        if self._tasks:
            raise RuntimeError("LogSync.start must be called once, got a second call")
        self._started_s = self._last_read_s = time.monotonic()
        self._tasks = [asyncio.create_task(self._follow(drafter), name="specdraft-log-follow"),
                       asyncio.create_task(self._queue.run(), name="specdraft-log-publish")]
        if self.placement is not None:
            self._tasks.append(asyncio.create_task(self.placement.run(), name="specdraft-placement"))

    def ready(self, tenant: str) -> bool:
        """True if this replica owns `tenant` and holds its outputs (always, without a placement)."""
        if self.placement is None:
            return True
        return self.placement.owns(tenant) and tenant not in self._warming and (
            tenant in self._cursors or tenant not in self._known)

    @property
    def warm(self) -> bool:
        return self._warm.is_set()

    async def wait_warm(self, timeout_s: float | None = None) -> bool:
        """True once the replay is done; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._warm.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def health(self) -> SyncHealth:
        now = time.monotonic()
        warmup_s = (self._warm_s if self.warm else now - self._started_s) if self._started_s else 0.0
        return SyncHealth(self.log.name, self.replica_id, self.warm, *self._warmup, warmup_s, self._reading,
                          self._read_errors, now - self._last_read_s if self._started_s else 0.0,
                          self._tenants, *self._applied, self._queue.health(), len(self._warming), self._dropped)

    async def stop(self, flush_s: float = 1.0) -> None:
        """Stops tailing, publishes what is queued (at most `flush_s`), closes the log (once)."""
        if self._stopped:
            return
        self._stopped = True
        await cancel_until_done(self._tasks)
        if self.placement is not None:
            await self.placement.leave()
        if flush_s > 0 and not await self._queue.flush(flush_s):
            log.warning("output log: %d outputs left unpublished at shutdown", self._queue.health().queued)
        await self.log.close()

    # ------------------------------------------------------------ the follow task

    async def _follow(self, drafter: "Drafter") -> None:
        c = self._config
        cursors = self._cursors
        discovered_s, delay, changes = float("-inf"), c.backoff_min_s, -1
        while True:
            if self.placement is not None and not self.placement.listed:
                await asyncio.sleep(0.02)  # the members first: tail only what this replica owns
                continue
            try:
                if time.monotonic() - discovered_s >= c.discover_s or self._placement_changes() != changes:
                    changes = self._placement_changes()
                    self._place(drafter, await self.log.tenants())
                    discovered_s = time.monotonic()
                    self._tenants = len(cursors)
                if not self.warm and not self._sized:
                    self._warmup[2], self._sized = (await self.log.size()).tokens, True
                asked = self._asked()
                result = await self.log.read(asked, c.read_count, c.block_ms if self.warm and not self._warming else 0)
            except Exception as e:  # noqa: BLE001 - the store is down or misbehaves: retry later
                self._read_failed(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, c.backoff_max_s)
                continue
            self._read_ok()
            delay = c.backoff_min_s
            caught_up = [t for t in self._warming if t in asked and result.cursors.get(t) == asked[t]]
            cursors.update(result.cursors)
            await self._apply(drafter, result.entries)
            self._caught_up(caught_up)
            if not self.warm and not result.entries:
                self._warm_done()

    def _placement_changes(self) -> int:
        return self.placement.changes if self.placement is not None else 0

    def _asked(self) -> dict[str, str]:
        """The cursors to read now: every tailed tenant but the newly owned ones not read yet, of
        which WARM_PER_READ at a time (each serves once its own replay is read and applied)."""
        if not self._warming:
            return self._cursors
        fresh = [t for t in self._warming if self._cursors[t] == START]
        if len(fresh) <= WARM_PER_READ:
            return self._cursors
        waiting = set(fresh[WARM_PER_READ:])
        return {t: c for t, c in self._cursors.items() if t not in waiting}

    def _place(self, drafter: "Drafter", tenants: Sequence[str]) -> None:
        """Tails the owned tenants of `tenants` (from START; warming when it was in the log before);
        stops tailing and frees the index of a tenant no longer owned."""
        owns = self.placement.owns if self.placement is not None else (lambda _: True)
        known, self._known = self._known, set(tenants)
        for tenant in tenants:
            if tenant not in self._cursors and owns(tenant):
                self._cursors[tenant] = START
                if self.warm and tenant in known:  # owned anew, not new to the log: its past is replayed
                    if not self._warming:
                        self._handover = (time.monotonic(), 0)
                    self._warming.add(tenant)
                    self._handover = (self._handover[0], self._handover[1] + 1)
        for tenant in [t for t in self._cursors if not owns(t)]:
            del self._cursors[tenant]
            self._warming.discard(tenant)
            self._dropped += drafter.drop_tenant(tenant)

    def _caught_up(self, tenants: list[str]) -> None:
        """Marks `tenants` replayed (they serve from now on); logs when the last newly owned one is."""
        if not tenants:
            return
        self._warming.difference_update(tenants)
        if not self._warming and self._handover[1]:
            log.info("placement: %d newly owned tenants replayed in %.2f s", self._handover[1],
                     time.monotonic() - self._handover[0])
            self._handover = (0.0, 0)

    def _read_failed(self, error: Exception) -> None:
        self._read_errors += 1
        if self._reading:
            expected = isinstance(error, LogUnavailable)
            log.warning("output log %s unreadable, retrying: %s", self.log.name, error,
                        exc_info=None if expected else error)
        self._reading = False

    def _read_ok(self) -> None:
        if not self._reading:
            log.info("output log %s readable again", self.log.name)
        self._reading, self._last_read_s = True, time.monotonic()

    def _warm_done(self) -> None:
        self._warm_s = time.monotonic() - self._started_s
        self._warm.set()
        log.info("output log %s replayed: %d outputs, %d tokens in %.2f s", self.log.name,
                 self._warmup[0], self._warmup[1], self._warm_s)

    async def _apply(self, drafter: "Drafter", entries: tuple[LogEntry, ...]) -> None:
        """Inserts other replicas' entries: each tenant's index sized once for its entries, then
        filled by `add_prior_outputs` calls of at most APPLY_CHUNK_TOKENS (plus one output);
        yields to the loop every APPLY_SLICE_S."""
        slice_start = time.perf_counter()
        for tenant, group in self._groups(entries).items():
            tokens = sum(int(e.tokens.shape[0]) for e in group)
            if tokens >= RESERVE_MIN_TOKENS:
                drafter.reserve_prior(tenant, tokens, len(group))
            for chunk in _chunks(group):
                try:
                    drafter.add_prior_outputs(tenant, np.concatenate([e.tokens for e in chunk]),
                                              np.fromiter((e.tokens.shape[0] for e in chunk), np.int64, len(chunk)))
                except ValueError:  # a corrupt or foreign entry: the chunk one by one, that one rejected
                    chunk = self._one_by_one(drafter, chunk)
                self._count(chunk)
                if time.perf_counter() - slice_start > APPLY_SLICE_S:
                    await asyncio.sleep(0)
                    slice_start = time.perf_counter()

    def _count(self, applied: list[LogEntry]) -> None:
        n = sum(int(e.tokens.shape[0]) for e in applied)
        self._applied[0] += len(applied)
        self._applied[1] += n
        if not self.warm:
            self._warmup[0] += len(applied)
            self._warmup[1] += n

    def _groups(self, entries: tuple[LogEntry, ...]) -> dict[str, list[LogEntry]]:
        """The entries to insert, by tenant in log order: not this replica's own (it inserted them
        when their session ended; but a tenant being replayed takes them all), not empty."""
        groups: dict[str, list[LogEntry]] = {}
        for entry in entries:
            if entry.origin == self.replica_id and entry.tenant not in self._warming:
                self._applied[2] += 1
            elif entry.tokens.shape[0]:
                groups.setdefault(entry.tenant, []).append(entry)
        return groups

    def _one_by_one(self, drafter: "Drafter", group: list[LogEntry]) -> list[LogEntry]:
        """Inserts `group` entry by entry; returns the entries inserted (the rest counted rejected)."""
        inserted = []
        for entry in group:
            try:
                drafter.add_prior_output(entry.tenant, entry.tokens)
                inserted.append(entry)
            except ValueError as e:
                self._applied[3] += 1
                log.warning("output log entry %s of a tenant rejected: %s", entry.entry_id, e)
        return inserted


def _chunks(group: list[LogEntry]) -> list[list[LogEntry]]:
    """`group` in order, cut after the entry that brings a chunk to APPLY_CHUNK_TOKENS or more.
    Example: entries of 5000, 5000, 100 tokens -> [[5000, 5000], [100]]."""
    chunks: list[list[LogEntry]] = [[]]
    size = 0
    for entry in group:
        chunks[-1].append(entry)
        size += int(entry.tokens.shape[0])
        if size >= APPLY_CHUNK_TOKENS:
            chunks.append([])
            size = 0
    return [c for c in chunks if c]
