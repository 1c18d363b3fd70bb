"""The retriever's event loop: uvloop where it is installed (the default dependency on Linux
and macOS), else asyncio's own. `SPECDRAFT_EVENT_LOOP` (`RetrieverSettings.event_loop`) picks:
"auto" (uvloop if importable), "uvloop" (required), "asyncio". On this project's 2-core VM
uvloop takes ~25-50 us off a loopback Draft and ~70 us off a health check (p50).
"""

from __future__ import annotations

import asyncio
import importlib.util

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_kind(setting: str) -> str:
    """"uvloop" or "asyncio": what `setting` (one of EVENT_LOOPS) resolves to here.
    Raises ValueError for "uvloop" when uvloop is not installed."""
    if setting not in EVENT_LOOPS:
        raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {setting!r}")
    available = importlib.util.find_spec("uvloop") is not None
    if setting == "uvloop" and not available:
        raise ValueError("SPECDRAFT_EVENT_LOOP must name an installed loop, got 'uvloop' (pip install uvloop)")
    return "uvloop" if setting != "asyncio" and available else "asyncio"


def new_event_loop(setting: str) -> asyncio.AbstractEventLoop:
    """A new loop of the kind `setting` resolves to (`loop_kind`)."""
    if loop_kind(setting) == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
