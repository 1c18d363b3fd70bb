"""Log set-up of the services: plain text, or one JSON object per line.

`configure_logging(settings.log_format)` installs one handler on the root logger (stderr); the
format is a setting of each service (`SPECDRAFT_LOG_FORMAT`, `--log-format`: one of FORMATS).
A JSON line holds `ts` (UTC, ISO 8601), `level`, `logger`, `msg` (the formatted message), the
record's `extra` fields, and `exc` (the traceback) when there is one. The services never log
prompts, drafts or generated text, in either format.

`SummaryLog` rate-limits a repeated line (refused calls: one summary line per kind per interval).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has: anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Root logger: one stderr handler in `fmt` at `level`; as `logging.basicConfig`, nothing
    changes when the root logger has handlers already (e.g. an embedding application's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


class SummaryLog:
    """A rate-limited log of repeated events (e.g. refused calls), one summary line per kind per
    interval: the first event of a kind is logged at once; later ones of that kind within
    `interval_s` are only counted, and the next line logged for the kind says how many were
    not ("(+N more like it in the last 12.3 s)"). So K kinds write at most K * (1 + T / interval_s)
    lines in T seconds, however many events there are. At most `max_kinds` kinds are tracked
    (further kinds share the kind "other"). Thread-safe; `clock` (seconds, monotonic) is for tests.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, level: int = logging.INFO,
                 max_kinds: int = 256, clock=None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._log, self._interval_s, self._level, self._max_kinds = logger, interval_s, level, max_kinds
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._state: dict[str, list[float]] = {}  # kind -> [last line's time, events not logged since]

    def note(self, kind: str, msg: str, *args: object) -> bool:
        """Counts one event of `kind`; logs `msg % args` (with the count of the events not logged
        since the last line) when the kind's interval has passed. True when a line was written."""
        now = self._clock()
        with self._lock:
            if kind not in self._state and len(self._state) >= self._max_kinds:
                kind = "other"
            state = self._state.setdefault(kind, [now - self._interval_s, 0])
            if now - state[0] < self._interval_s:
                state[1] += 1
                return False
            skipped, since = int(state[1]), now - state[0]
            state[0], state[1] = now, 0
        if skipped:
            msg += f" (+{skipped} more like it in the last {since:.1f} s)"
        self._log.log(self._level, msg, *args)
        return True
