"""`FileLog`: the embedded output log, one SQLite file in a data directory (see `retriever.outputlog.contract`).

The default when no Redis URL is set: one machine keeps its prior outputs across
restarts with no server. `data_dir/log/outputs.sqlite3`, WAL mode:
- `entries(id INTEGER PRIMARY KEY AUTOINCREMENT, tenant, origin, seq, tokens BLOB, n)`,
  indexed by (tenant, id). AUTOINCREMENT: ids are never reused after trimming, so an id
  is a cursor;
- `tenants(tenant PRIMARY KEY, tokens)`: the token count that trimming keeps under budget;
- `origins(tenant, origin, seq, updated_s)`: the last seq appended per publisher
  (idempotent appends, also after trimming); rows quiet for `dedup_ttl_s` are pruned.
Each append batch is one transaction (kill -9 leaves no torn entry). Several processes on
one machine may share the file (busy timeout = `timeout_s`). SQLite calls run on one
worker thread; `read` with `block_ms` polls (every `POLL_S`) instead of blocking. Cursors
are entry ids; a read advances a tenant's cursor to the newest id of the whole file when
that tenant has nothing more, so an idle poll is one MAX(id) lookup.

Corruption is not an outage: when SQLite answers "database disk image is malformed" or "file
is not a database" (at open or on any call), the file (with its -wal and -shm) is moved aside
to `outputs.sqlite3.corrupt-<UTC time>` (logged at ERROR with both paths), a fresh file is
started holding every entry that could still be read (scanning the entries by id from both
ends, keeping their ids so replicas' cursors stay valid; new ids continue above the old ones),
and the call is retried once. Other SQLite errors (locked, I/O) raise LogUnavailable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from retriever.outputlog.contract import (
    LogConfig,
    LogEntry,
    LogRead,
    LogSize,
    LogUnavailable,
    PendingOutput,
    decode_tokens,
)

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_CORRUPTION = (11, 26)  # SQLITE_CORRUPT ("malformed"), SQLITE_NOTADB ("file is not a database")
POLL_S = 0.02
PRUNE_EVERY_S = 3600.0  # how often stale idempotency rows are looked for
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
  id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, origin TEXT NOT NULL,
  seq INTEGER NOT NULL, tokens BLOB NOT NULL, n INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_tenant ON entries (tenant, id);
CREATE TABLE IF NOT EXISTS tenants (tenant TEXT PRIMARY KEY, tokens INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS origins (tenant TEXT NOT NULL, origin TEXT NOT NULL, seq INTEGER NOT NULL,
  updated_s REAL NOT NULL, PRIMARY KEY (tenant, origin)) WITHOUT ROWID;
"""


def log_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "log" / "outputs.sqlite3"


def is_corruption(error: BaseException) -> bool:
    """True when SQLite says the file is damaged (not locked, busy, or out of reach)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and isinstance(code, int) and code & 0xFF in _CORRUPTION


class FileLog:
    """The `OutputLog` contract over SQLite at `log_path(config.data_dir)` (created if missing).

    Raises LogUnavailable at construction when the file cannot be opened or is of another format;
    a corrupt file is quarantined instead (see the module docstring).
    """

    name = "file"

    def __init__(self, config: LogConfig, path: str | Path | None = None) -> None:
        self._config = config
        self.path = Path(path) if path is not None else log_path(config.data_dir)
        self._pruned_s = float("-inf")
        self._inode: int | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="specdraft-file-log")
        try:
            self._db = self._pool.submit(self._open_or_recover).result()
        except (sqlite3.Error, OSError) as e:
            self._pool.shutdown(wait=False)
            raise LogUnavailable(f"output log {self.path} must be a writable SQLite file, got {e}") from None

    def _open_or_recover(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as e:
            if not is_corruption(e):
                raise
            return self._quarantine(e)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self._config.timeout_s, isolation_level=None,
                             check_same_thread=False)
        try:
            self._inode = _inode(self.path)  # the file this connection is on (see _recover)
            return self._prepare(db)
        except BaseException:
            db.close()
            raise

    def _prepare(self, db: sqlite3.Connection) -> sqlite3.Connection:
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: durable across process kills, atomic always; FULL (durable): fsynced at each commit
        db.execute("PRAGMA synchronous=FULL" if self._config.durable else "PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
        version = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[0]
        if version != str(FORMAT_VERSION):
            raise sqlite3.DatabaseError(f"format_version must be {FORMAT_VERSION}, got {version}")
        return db

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        """fn(*args) on the worker thread; a corrupt file is quarantined and fn retried once."""
        loop, db = asyncio.get_running_loop(), self._db
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as e:
            if not is_corruption(e):
                raise LogUnavailable(f"output log {self.path} must be usable, got {type(e).__name__}: {e}") from None
            error = e
        try:
            await loop.run_in_executor(self._pool, self._recover, error, db)
            return await loop.run_in_executor(self._pool, fn, *args)
        except (sqlite3.Error, OSError) as e:
            raise LogUnavailable(f"output log {self.path} must be usable, got {type(e).__name__}: {e}") from None

    def _recover(self, error: sqlite3.Error, failed: sqlite3.Connection) -> None:
        """Quarantines the file `failed` was on, once: a later call that failed on it finds a new
        connection, and a process sharing the file that finds it already replaced (another
        inode at the path) opens the fresh one instead of quarantining it."""
        if self._db is not failed:
            return
        failed.close()
        self._db = self._open() if _inode(self.path) not in (None, self._inode) else self._quarantine(error)

    def _quarantine(self, error: sqlite3.Error) -> sqlite3.Connection:
        """Moves the corrupt file aside and opens a fresh one holding what could be read of it."""
        rows, origins, top = _salvage(self.path, self._config.timeout_s)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{self.path}{suffix}").exists():
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        log.error("output log %s is corrupt (%s): moved aside to %s; a fresh log starts with the %d entries "
                  "that could be read", self.path, error, aside, len(rows))
        db = self._open()
        _restore(db, rows, origins, top)
        return db

    async def append(self, batch: Sequence[PendingOutput]) -> None:
        if batch:
            await self._run(self._append, list(batch))

    def _append(self, batch: list[PendingOutput]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            grown: dict[str, int] = {}
            now = time.time()
            for item in batch:
                if self._seen(item, now):
                    continue
                db.execute("INSERT INTO entries (tenant, origin, seq, tokens, n) VALUES (?, ?, ?, ?, ?)",
                           (item.tenant, item.origin, item.seq, item.payload, item.num_tokens))
                grown[item.tenant] = grown.get(item.tenant, 0) + item.num_tokens
            for tenant, n in grown.items():
                db.execute("INSERT INTO tenants VALUES (?, ?) ON CONFLICT (tenant) "
                           "DO UPDATE SET tokens = tokens + excluded.tokens", (tenant, n))
                self._trim(tenant)
            if now - self._pruned_s > PRUNE_EVERY_S:
                db.execute("DELETE FROM origins WHERE updated_s < ?", (now - self._config.dedup_ttl_s,))
                self._pruned_s = now
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _seen(self, item: PendingOutput, now: float) -> bool:
        """True if (origin, seq) was appended before for this tenant; else records it."""
        row = self._db.execute("SELECT seq FROM origins WHERE tenant = ? AND origin = ?",
                               (item.tenant, item.origin)).fetchone()
        if row is not None and item.seq <= row[0]:
            return True
        self._db.execute("INSERT OR REPLACE INTO origins VALUES (?, ?, ?, ?)", (item.tenant, item.origin, item.seq, now))
        return False

    def _trim(self, tenant: str) -> None:
        """Deletes the tenant's oldest entries while it holds more than the budget (newest stays)."""
        db = self._db
        total = db.execute("SELECT tokens FROM tenants WHERE tenant = ?", (tenant,)).fetchone()[0]
        over = total - self._config.token_budget
        if over <= 0:
            return
        newest = db.execute("SELECT MAX(id) FROM entries WHERE tenant = ?", (tenant,)).fetchone()[0]
        cut, removed = None, 0
        for entry_id, n in db.execute("SELECT id, n FROM entries WHERE tenant = ? AND id < ? ORDER BY id",
                                      (tenant, newest)):
            if removed >= over:
                break
            cut, removed = entry_id, removed + n
        if cut is not None:
            db.execute("DELETE FROM entries WHERE tenant = ? AND id <= ?", (tenant, cut))
            db.execute("UPDATE tenants SET tokens = tokens - ? WHERE tenant = ?", (removed, tenant))

    async def read(self, cursors: dict[str, str], count: int, block_ms: int) -> LogRead:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000.0
        while True:
            result = await self._run(self._read, dict(cursors), count)
            if result.entries or loop.time() >= deadline:
                return result
            cursors = result.cursors
            await asyncio.sleep(POLL_S)

    def _read(self, cursors: dict[str, str], count: int) -> LogRead:
        """One snapshot (a read transaction): entries after each cursor, cursors advanced."""
        db, entries, advanced = self._db, [], dict(cursors)
        db.execute("BEGIN")
        try:
            newest = db.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0]
            for tenant, cursor in cursors.items():
                if int(cursor) >= newest:
                    continue
                rows = db.execute("SELECT id, origin, tokens FROM entries WHERE tenant = ? AND id > ? "
                                  "ORDER BY id LIMIT ?", (tenant, int(cursor), count)).fetchall()
                entries.extend(LogEntry(tenant, str(i), origin, decode_tokens(payload)) for i, origin, payload in rows)
                advanced[tenant] = str(rows[-1][0] if len(rows) == count else newest)
        finally:
            db.execute("COMMIT")
        return LogRead(tuple(entries), advanced)

    async def tenants(self) -> list[str]:
        return await self._run(lambda: [r[0] for r in self._db.execute("SELECT tenant FROM tenants ORDER BY tenant")])

    async def size(self) -> LogSize:
        def count() -> LogSize:
            tenants, tokens = self._db.execute("SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM tenants").fetchone()
            return LogSize(tenants, self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0], tokens)

        return await self._run(count)

    async def close(self) -> None:
        try:
            await self._run(lambda: self._db.close())
        finally:
            self._pool.shutdown(wait=False)


_Row = tuple  # (id, tenant, origin, seq, tokens, n) of `entries`


def _salvage(path: Path, timeout_s: float) -> tuple[list[_Row], list[tuple], int]:
    """What can still be read of a corrupt log: its entries (scanned by id from both ends, so a
    bad page in the middle loses only what is on it), the idempotency rows, the highest id used."""
    rows: dict[int, _Row] = {}
    origins: list[tuple] = []
    sequence: list[tuple] = []
    try:
        db = sqlite3.connect(path, timeout=timeout_s)
    except sqlite3.Error:
        return [], [], 0
    try:
        for order in ("ASC", "DESC"):
            _scan(db, f"SELECT id, tenant, origin, seq, tokens, n FROM entries ORDER BY id {order}",
                  lambda r: rows.setdefault(r[0], r) if _entry_ok(r) else None)
        _scan(db, "SELECT tenant, origin, seq, updated_s FROM origins", origins.append)
        _scan(db, "SELECT seq FROM sqlite_sequence WHERE name = 'entries'", sequence.append)
    finally:
        db.close()
    top = max([0, *rows, *(r[0] for r in sequence if isinstance(r[0], int))])
    return [rows[i] for i in sorted(rows)], origins, top


def _scan(db: sqlite3.Connection, sql: str, keep: Callable[[tuple], object]) -> None:
    """Passes each row of `sql` to `keep` until the first error (a corrupt page)."""
    try:
        for row in db.execute(sql):
            keep(row)
    except sqlite3.Error:
        pass


def _entry_ok(r: tuple) -> bool:
    return (len(r) == 6 and isinstance(r[0], int) and r[0] > 0 and isinstance(r[1], str) and isinstance(r[2], str)
            and isinstance(r[3], int) and isinstance(r[4], bytes) and len(r[4]) == 4 * r[5])


def _restore(db: sqlite3.Connection, rows: list[_Row], origins: list[tuple], top: int) -> None:
    """Writes salvaged entries (their ids kept) into a fresh log, with the tenants' token counts,
    the idempotency rows, and AUTOINCREMENT past `top` (one transaction)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("INSERT INTO entries (id, tenant, origin, seq, tokens, n) VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.execute("INSERT INTO tenants SELECT tenant, SUM(n) FROM entries GROUP BY tenant")
        db.executemany("INSERT OR REPLACE INTO origins VALUES (?, ?, ?, ?)",
                       [o for o in origins if len(o) == 4 and all(isinstance(v, t) for v, t in
                                                                 zip(o, (str, str, int, float)))])
        db.execute("INSERT INTO origins SELECT tenant, origin, MAX(seq), ? FROM entries WHERE true "
                   "GROUP BY tenant, origin ON CONFLICT (tenant, origin) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                   (time.time(),))
        if top > 0:
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'entries'")
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('entries', ?)", (top,))
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _rollback(db: sqlite3.Connection) -> None:
    """ROLLBACK, keeping the error that led to it (a corrupt file may refuse the rollback too)."""
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass
