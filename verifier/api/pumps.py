"""A generation of the HTTP API in a thread of its own (`verifier.api.http_api` uses these).

- `Pump(chunks, stop, running)`: runs `Generator.stream`'s chunks in a thread, handing them to the
  event loop (`async with pump as chunks: async for chunk in chunks`); domain errors come out as
  `ApiError`. Setting `stop` (`client_left`, leaving the `async with`) ends the generation within
  one step.
- `Running`: the pumps in flight; `drain(grace_s)` ends them when the server stops.
- `disconnected(receive, pump)`: stops the pump once the ASGI receive channel says the client left.
- `Refused`: an ApiError answered with a `Retry-After` header.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Iterator

from starlette.types import Receive

from retriever import errors
from verifier.api.json_fields import ApiError

if TYPE_CHECKING:
    from verifier.api.generation import Chunk


class Refused(ApiError):
    """An ApiError answered with a `Retry-After: retry_after_s` header."""

    def __init__(self, error: ApiError, retry_after_s: int) -> None:
        super().__init__(error.status, error.message, error.type, error.param, error.code)
        self.retry_after_s = retry_after_s


async def disconnected(receive: Receive, pump: "Pump") -> None:
    """Waits for the client to leave (the request's body already read), then stops the pump."""
    while (await receive())["type"] != "http.disconnect":
        pass
    pump.client_left()


class Running:
    """The generations in flight (their threads); `drain` ends them when the server stops."""

    def __init__(self) -> None:
        self._pumps: set[Pump] = set()
        self._cond = threading.Condition()

    def add(self, pump: "Pump") -> None:
        with self._cond:
            self._pumps.add(pump)

    def remove(self, pump: "Pump") -> None:
        with self._cond:
            self._pumps.discard(pump)
            self._cond.notify_all()

    def drain(self, grace_s: float) -> None:
        """Waits up to grace_s for the generations to end, then cuts the rest short (each stops
        within one model step) and waits for their threads."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pumps, timeout=grace_s)
            for pump in self._pumps:
                pump.cut_short()
            self._cond.wait_for(lambda: not self._pumps, timeout=60)


class Pump:
    """Runs a generation's chunks in a thread of its own, handing them to the event loop; on exit
    (done, failed or cancelled) or once `stop` is set (the generation asks it after every step) the
    thread stops after its current step and closes the generation itself (a generator cannot be
    closed from another thread while it runs a step). Domain errors come out as ApiError."""

    _END = object()

    def __init__(self, chunks: Iterator["Chunk"], stop: threading.Event, running: Running) -> None:
        self._chunks, self._running = chunks, running
        self._stop, self._cut = stop, False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    async def __aenter__(self) -> "Pump":
        self._running.add(self)
        threading.Thread(target=self._run, name="verifier-http-generation", daemon=True).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()

    def client_left(self) -> None:
        self._stop.set()

    def cut_short(self) -> None:
        self._cut = True
        self._stop.set()

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has ended
            self._stop.set()

    def _run(self) -> None:
        try:
            for chunk in self._chunks:
                if self._stop.is_set():
                    break
                self._put(chunk)
        except errors.SpecdraftError as e:
            self._put(ApiError.of(e, code="deadline_exceeded" if isinstance(e, errors.DeadlineExceeded) else None))
        except Exception as e:  # noqa: BLE001 - handed to the request's task
            self._put(e)
        finally:
            self._chunks.close()
            if self._cut:
                self._put(ApiError(503, "the generation must finish within the server's stop grace period, "
                                   "got cut short", "server_error", code="unavailable"))
            self._put(self._END)
            self._running.remove(self)

    def __aiter__(self) -> "Pump":
        return self

    async def __anext__(self) -> "Chunk":
        item = await self._queue.get()
        if item is self._END:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item
