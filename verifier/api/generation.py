"""Generations on the model: `run` (the core loop behind both APIs) and `Generator` (its lock).

- `run(engine, request, drafter, model, metrics=None) -> Iterator[Chunk]`: drives
  `Engine.generate` with the retriever session `drafter` (`verifier.drafting.StreamDraftSource`
  around it), streams text through `verifier.api.stops.TextStream` (stop strings, EOS, llama.cpp's
  line limits, no split characters) and ends with a chunk carrying the finish reason and
  `GenerationStats`.
- `Generator`: the model's one lock; `stream(request, api, stop, deadline)` runs one generation at a
  time and reports it to the `VerifierMetrics` it holds (`generator.metrics`). The gRPC servicer
  (`verifier.api.grpc_service`) and the HTTP API (`verifier.api.http_api`) both stream from it.
  Bounded: at most `max_queued` generations wait behind the running one (beyond: `QueueFull`, at
  once); a generation whose `stop()` turns true (its client left) or whose deadline passes ends
  within one model step, waiting in the queue or running.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from retriever import errors

from verifier.api.metrics import VerifierMetrics
from verifier.api.prediction import prediction_usage
from verifier.api.requests import GenerationRequest
from verifier.api.stops import LineLimits, TextStream
from verifier.decoding.engine import Engine
from verifier.decoding.stats import GenerationStats, StepTally
from verifier.drafting import StreamDraftSource

if TYPE_CHECKING:
    from retriever.client import DraftStreamSession, RetrieverClient
    from verifier.decoding.backend import Backend


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "eos" | "length" | "stop", last chunk only
    stats: GenerationStats | None = None  # last chunk only
    prediction: tuple[int, int] | None = None  # last chunk, with a prediction: (accepted, rejected) tokens


def run(engine: Engine, request: GenerationRequest, drafter: "DraftStreamSession | None",
        model: "Backend", metrics: VerifierMetrics | None = None,
        stop: Callable[[], bool] | None = None) -> Iterator[Chunk]:
    """Streams the generation's chunks; the last one carries finish_reason and stats. `drafter`:
    the retriever session drafting for it (None: plain decoding). `metrics`: told of every step
    and of draft fallbacks. `stop`: asked after every step; True ends the generation there, without
    a last chunk."""
    t0 = time.perf_counter()
    stops = frozenset(model.eos_token_ids) | frozenset(request.stop_token_ids)
    stream = TextStream(_decoder(model.tokenizer), request.stops, stops,
                        LineLimits(request.min_indent, request.line_time_limit_s))
    source = StreamDraftSource(drafter, metrics.draft_fallback if metrics is not None else None,
                               request.prediction_ids) if drafter is not None else None
    tally = StepTally()
    steps = engine.generate(list(request.prompt_ids), request.max_new_tokens, request.sampling, source, list(stops))
    try:
        for step in steps:
            tally.add(step)
            if metrics is not None:
                metrics.step(step)
            delta = stream.push(step.tokens)
            tally.generated += delta.generated
            if delta.text or delta.token_ids:
                yield Chunk(delta.text, tuple(delta.token_ids))
            if stream.stopped:
                break
            if stop is not None and stop():
                return
    finally:
        steps.close()
        if source is not None:
            source.finish(stream.kept)
    tail = stream.finish()
    reason = stream.finish_reason or ("length" if tally.generated >= request.max_new_tokens else "eos")
    prediction = prediction_usage(request.prediction_ids, stream.kept) if request.prediction_ids else None
    yield Chunk(tail, (), reason, tally.stats(len(request.prompt_ids), time.perf_counter() - t0), prediction)


def _decoder(tokenizer):
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return decode


class QueueFull(errors.Overloaded):
    """Too many generations wait for the model; `retry_after_s`: a hint for the client, in whole seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Generator:
    """The model's generations, one at a time: `stream` holds the one lock of the process (shared by
    the gRPC servicer and the HTTP API) from its first chunk until it is exhausted or closed; at most
    `max_queued` more wait for it."""

    def __init__(self, model: "Backend", engine: Engine, retriever: "RetrieverClient | None",
                 metrics: VerifierMetrics | None = None, max_queued: int = 4) -> None:
        self.model, self._engine, self._retriever = model, engine, retriever
        self.metrics = metrics if metrics is not None else VerifierMetrics.create()
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._admitted: dict[int, Callable[[], bool]] = {}  # key -> stop(): running + waiting, until they end
        self._keys = itertools.count()
        self._count_lock = threading.Lock()
        self._mean_wall_s = 1.0  # moving mean of a generation's wall time (the Retry-After hint)

    def stream(self, request: GenerationRequest, api: str = "grpc", stop: Callable[[], bool] | None = None,
               deadline: float | None = None) -> Iterator[Chunk]:
        """`run`'s chunks; close the iterator to stop early (the lock is released then). `api`
        ("grpc" or "http") labels the generation in the metrics. Admission is at once: raises
        `QueueFull` when `max_queued` generations already wait. Once iterated: waits for the model;
        `stop()` true (asked while waiting and after every step) ends the iterator early;
        `deadline` (time.monotonic(); None: none) passing raises `errors.DeadlineExceeded`."""
        stop = stop or (lambda: False)
        key = self._admit(stop)
        release = _Once(lambda: self._release(key))
        return _Admitted(self._stream(request, api, stop, deadline, release), release)

    def _admit(self, stop: Callable[[], bool]) -> int:
        """Admits a generation (its key); QueueFull when `max_queued` live ones wait behind the running
        one (a generation whose stop() is true no longer counts: it ends within a step)."""
        with self._count_lock:
            live = self._live()
            if live > self.max_queued:
                hint = max(1, math.ceil(self._mean_wall_s * live))
                raise QueueFull(f"the generations waiting for the model must be at most {self.max_queued}, got "
                                f"{live - 1} waiting and one running; retry after {hint} s", hint)
            key = next(self._keys)
            self._admitted[key] = stop
            self.metrics.queued.set(max(0, live))
            return key

    def _release(self, key: int) -> None:
        with self._count_lock:
            del self._admitted[key]
            self.metrics.queued.set(max(0, self._live() - 1))

    def _live(self) -> int:
        return sum(1 for stop in self._admitted.values() if not stop())

    def _wait_turn(self, stop: Callable[[], bool], deadline: float | None) -> bool:
        """Takes the lock (True); False when `stop()` turned true first; DeadlineExceeded past `deadline`."""
        while not self._lock.acquire(timeout=0.02):
            if stop():
                return False
            if deadline is not None and time.monotonic() > deadline:
                raise errors.DeadlineExceeded("the generation must start before its deadline, got the deadline "
                                              "passed while waiting for the model")
        if stop():  # left while waiting: no step for it (not even the prompt's)
            self._lock.release()
            return False
        return True

    def _stream(self, request: GenerationRequest, api: str, stop: Callable[[], bool], deadline: float | None,
                release: "_Once") -> Iterator[Chunk]:
        try:
            try:
                turn = self._wait_turn(stop, deadline)
            except errors.DeadlineExceeded:
                self.metrics.ended_early(api, "deadline")
                raise
            if not turn:
                self.metrics.ended_early(api, "cancelled")
                return
            try:
                yield from self._locked(request, api, stop, deadline)
            finally:
                self._lock.release()
        finally:
            release()

    def _locked(self, request: GenerationRequest, api: str, stop: Callable[[], bool],
                deadline: float | None) -> Iterator[Chunk]:
        t0 = time.monotonic()
        late = (lambda: time.monotonic() > deadline) if deadline is not None else (lambda: False)
        drafter = None
        if self._retriever is not None and not request.no_draft:
            drafter = self._retriever.session(request.tenant, request.request_id)
        chunks = run(self._engine, request, drafter, self.model, self.metrics, lambda: stop() or late())
        outcome = "cancelled"  # until the last chunk: the consumer closed the stream early
        try:
            for chunk in chunks:
                if chunk.stats is not None and chunk.finish_reason is not None:
                    outcome = ""
                    self.metrics.generated(api, chunk.finish_reason, chunk.stats)
                yield chunk
            if outcome and late() and not stop():
                outcome = "deadline"
                raise errors.DeadlineExceeded(f"the generation must end before its deadline, got cut after "
                                              f"{time.monotonic() - t0:.1f} s of generating")
        except errors.DeadlineExceeded:
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            chunks.close()
            self._mean_wall_s = 0.8 * self._mean_wall_s + 0.2 * (time.monotonic() - t0)
            if outcome:
                self.metrics.ended_early(api, outcome)


class _Once:
    """Calls `fn` on the first call only (thread-safe)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn, self._done, self._lock = fn, False, threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._fn()


class _Admitted:
    """An admitted generation's chunks: closing it (or dropping it unstarted) frees its queue place."""

    def __init__(self, chunks: Iterator[Chunk], release: _Once) -> None:
        self._chunks, self._release = chunks, release

    def __iter__(self) -> "_Admitted":
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        try:
            self._chunks.close()  # type: ignore[attr-defined]
        finally:
            self._release()

    def __del__(self) -> None:
        self._release()
