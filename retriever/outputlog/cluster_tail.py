"""Tailing many tenants on a Redis Cluster without polling each of them: change notes.

No XREAD may span slots, so reading T tenants is T commands, and redis-py spends ~0.15 ms of
CPU on each (XREAD even one server round trip more, to ask for its movable keys): a replica
polling its 700 tenants every 50 ms would burn most of a core doing nothing. Instead:

- every append batch, once acknowledged, adds one note to the stream `P:{changes}` naming its
  tenants (field `t`: their percent-encoded tags, comma-separated; MAXLEN ~ NOTES_MAXLEN). Best
  effort: a note that fails is counted (`notes_failed`), never fails the append;
- a reader polls the notes (one XRANGE) and reads only the tenants (a) named by a note since its
  last poll, (b) whose cursor it did not hand out itself (new to the read, or reset to START by
  the caller), (c) that advanced at its previous read (more may be pending), and (d) every tenant
  once per SWEEP_S, and whenever the notes cannot be read (a lost note, trimmed notes, the notes'
  master failing over: bounded lag, never a lost entry).

Ordering: a note is written after its entries are acknowledged and a sweep takes the notes'
cursor before it reads, so every entry is read by a sweep or named by a note after that cursor.

    tail = ClusterTail(client, "specdraft:{changes}")
    due = await tail.due(cursors)       # the tenants to read now
    ...                                 # read them, advancing `advanced` (tenant -> cursor)
    tail.advanced(cursors, advanced)
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Iterable
from urllib.parse import quote, unquote

from redis.exceptions import RedisClusterException, RedisError

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster

NOTES_MAXLEN = 100_000  # notes kept (approximate trimming)
NOTES_PER_POLL = 10_000  # notes read per poll at most (the rest at the next poll)
SWEEP_S = 2.0  # every tailed tenant is read at least this often
_STORE_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


class ClusterTail:
    """Which tenants a cluster read must ask for now; see the module docstring. One per reader."""

    def __init__(self, client: "RedisCluster", notes_key: str) -> None:
        self._client, self.key = client, notes_key
        self._cursor: str | None = None  # notes read up to here; None: sweep (and take it) next
        self._swept_s = float("-inf")
        self._handed: dict[str, str] = {}  # tenant -> the cursor the last read handed out
        self._hot: set[str] = set()  # tenants that advanced at the last read
        self.sweeps = self.notes_failed = 0

    async def note(self, writer: "RedisCluster", tenants: Iterable[str]) -> None:
        """Adds one note naming `tenants` (after their appends were acknowledged); never raises."""
        try:
            await writer.xadd(self.key, {"t": ",".join(quote(t, safe="") for t in tenants)},
                              maxlen=NOTES_MAXLEN, approximate=True)
        except _STORE_ERRORS:
            self.notes_failed += 1

    async def due(self, cursors: dict[str, str]) -> list[str]:
        """The tenants of `cursors` to read now (all of them at a sweep)."""
        try:
            if self._cursor is None or time.monotonic() - self._swept_s >= SWEEP_S:
                self._cursor = await self._last_note()  # before the sweep reads: see the ordering above
                self._swept_s = time.monotonic()
                self.sweeps += 1
                return list(cursors)
            noted = await self._noted()
        except _STORE_ERRORS:
            self._cursor = None
            self.sweeps += 1
            return list(cursors)
        handed, hot = self._handed, self._hot
        return [t for t, c in cursors.items() if t in noted or t in hot or handed.get(t) != c]

    def advanced(self, asked: dict[str, str], advanced: dict[str, str]) -> None:
        """After a read of `asked` (tenant -> cursor) that handed out `advanced`."""
        self._hot = {t for t, c in advanced.items() if asked.get(t) != c}
        self._handed = advanced

    async def _last_note(self) -> str:
        last = await self._client.xrevrange(self.key, "+", "-", count=1)
        return last[0][0].decode() if last else "0-0"

    async def _noted(self) -> set[str]:
        notes = await self._client.xrange(self.key, f"({self._cursor}", "+", count=NOTES_PER_POLL)
        tenants: set[str] = set()
        for note_id, fields in notes:
            self._cursor = note_id.decode()
            tags = fields.get(b"t", b"").decode()
            tenants.update(unquote(tag) for tag in tags.split(",") if tag)
        return tenants
