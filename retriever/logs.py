"""Log set-up of the services: plain text, or one JSON object per line.

`configure_logging(settings.log_format)` installs one handler on the root logger (stderr); the
format is a setting of each service (`SPECDRAFT_LOG_FORMAT`, `--log-format`: one of FORMATS).
A JSON line holds `ts` (UTC, ISO 8601), `level`, `logger`, `msg` (the formatted message), the
record's `extra` fields, and `exc` (the traceback) when there is one. The services never log
prompts, drafts or generated text, in either format.
"""

from __future__ import annotations

import json
import logging
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
