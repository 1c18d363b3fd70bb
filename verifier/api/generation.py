"""Generations on the model: `run` (the core loop behind both APIs) and `Generator` (its lock).

- `run(engine, request, drafter, model, metrics=None) -> Iterator[Chunk]`: drives
  `Engine.generate` with the retriever session `drafter` (`verifier.drafting.StreamDraftSource`
  around it), streams text through `verifier.api.stops.TextStream` (stop strings, EOS, no split
  characters) and ends with a chunk carrying the finish reason and `GenerationStats`.
- `Generator`: the model's one lock; `stream(request, api)` runs one generation at a time and
  reports it to the `VerifierMetrics` it holds (`generator.metrics`). The gRPC servicer
  (`verifier.api.grpc_service`) and the HTTP API (`verifier.api.http_api`) both stream from it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from verifier.api.metrics import VerifierMetrics
from verifier.api.prediction import prediction_usage
from verifier.api.requests import GenerationRequest
from verifier.api.stops import TextStream
from verifier.decoding.engine import Engine
from verifier.decoding.stats import GenerationStats, StepTally
from verifier.drafting import StreamDraftSource

if TYPE_CHECKING:
    from retriever.client import DraftStreamSession, RetrieverClient
    from verifier.decoding.model import LoadedModel


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "eos" | "length" | "stop", last chunk only
    stats: GenerationStats | None = None  # last chunk only
    prediction: tuple[int, int] | None = None  # last chunk, with a prediction: (accepted, rejected) tokens


def run(engine: Engine, request: GenerationRequest, drafter: "DraftStreamSession | None",
        model: "LoadedModel", metrics: VerifierMetrics | None = None) -> Iterator[Chunk]:
    """Streams the generation's chunks; the last one carries finish_reason and stats. `drafter`:
    the retriever session drafting for it (None: plain decoding). `metrics`: told of every step
    and of draft fallbacks."""
    t0 = time.perf_counter()
    stops = frozenset(model.eos_token_ids) | frozenset(request.stop_token_ids)
    stream = TextStream(_decoder(model.tokenizer), request.stops, stops)
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


class Generator:
    """The model's generations, one at a time: `stream` holds the one lock of the process (shared by
    the gRPC servicer and the HTTP API) from its first chunk until it is exhausted or closed."""

    def __init__(self, model: "LoadedModel", engine: Engine, retriever: "RetrieverClient | None",
                 metrics: VerifierMetrics | None = None) -> None:
        self.model, self._engine, self._retriever = model, engine, retriever
        self.metrics = metrics if metrics is not None else VerifierMetrics.create()
        self._lock = threading.Lock()

    def stream(self, request: GenerationRequest, api: str = "grpc") -> Iterator[Chunk]:
        """`run`'s chunks; close the iterator to stop early (the lock is released then). `api`
        ("grpc" or "http") labels the generation in the metrics."""
        with self._lock:
            drafter = None
            if self._retriever is not None and not request.no_draft:
                drafter = self._retriever.session(request.tenant, request.request_id)
            chunks = run(self._engine, request, drafter, self.model, self.metrics)
            outcome = "cancelled"  # until the last chunk: the consumer closed the stream early
            try:
                for chunk in chunks:
                    if chunk.stats is not None and chunk.finish_reason is not None:
                        outcome = ""
                        self.metrics.generated(api, chunk.finish_reason, chunk.stats)
                    yield chunk
            except Exception:
                outcome = "error"
                raise
            finally:
                chunks.close()
                if outcome:
                    self.metrics.ended_early(api, outcome)
