"""The `specdraft.v1.Verifier` service: proto -> `validate` -> `run` (the core loop) -> proto.

- `validate(request, model, settings) -> GenerationRequest`: the proto as `RequestValues`, checked
  by `verifier.validation.check` (the rules shared with the HTTP API); raises `InvalidArgument`
  (bad fields, prompt too long for the model) or `FailedPrecondition` (chat without a template).
- `run(engine, request, drafter, model, metrics=None) -> Iterator[Chunk]`: drives `Engine.generate`, streams
  text through `verifier.stops.TextStream` (stop strings, EOS, no split characters) and ends
  with a chunk carrying the finish reason and `GenerationStats`.
- `Generator`: the model's one lock; `stream(request, api)` runs one generation at a time and
  reports it to the `VerifierMetrics` it holds (`generator.metrics`).
- `VerifierServicer`: the gRPC shell over a `Generator`; domain
  errors become status codes through `retriever.service.status_of` (the one mapping of
  `retriever.errors`), before any message is streamed. With auth (`verifier.auth.ApiAuth`), a
  call needs `authorization: Bearer <token>` metadata (UNAUTHENTICATED) and drafts for its
  token's tenant (another one: PERMISSION_DENIED); refusals are counted in `rejections`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import grpc

from protos.specdraft.v1 import verifier_pb2 as pb
from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from retriever import errors
from retriever.service import status_of
from verifier.auth import ApiAuth, denied, grpc_principal, tenant_for
from verifier.engine import Engine, StepResult
from verifier.metrics import VerifierMetrics, reason_label
from verifier.settings import VerifierSettings
from verifier.stops import TextStream
from verifier.validation import GRPC_NAMES, ChatMessage, GenerationRequest, RequestValues, check

if TYPE_CHECKING:
    from retriever.client import RetrieverClient
    from verifier.engine import DraftSource
    from verifier.model import LoadedModel

_FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int  # up to the stop, an EOS token included
    steps: int
    mean_accepted_tokens: float
    draft_s: float
    verify_s: float
    tokens_per_s: float
    accepted_by_source: dict[int, int]  # retriever Source number -> accepted draft tokens
    draft_nodes: int
    accepted_draft_tokens: int
    wall_s: float


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "eos" | "length" | "stop", last chunk only
    stats: GenerationStats | None = None  # last chunk only


# ---------------------------------------------------------------- validation


def values_of(request: pb.GenerateRequest) -> RequestValues:
    """The proto as plain values (no checks)."""
    kind = request.WhichOneof("prompt")
    s = request.sampling
    return RequestValues(
        text=request.text if kind == "text" else None,
        token_ids=tuple(request.token_ids.ids) if kind == "token_ids" else None,
        messages=tuple(ChatMessage(m.role, m.content) for m in request.chat.messages) if kind == "chat" else None,
        temperature=float(s.temperature), top_p=float(s.top_p) if s.HasField("top_p") else 1.0, top_k=int(s.top_k),
        seed=s.seed if s.HasField("seed") else None, typical=bool(s.typical_acceptance),
        max_new_tokens=int(s.max_new_tokens), stops=tuple(s.stop), tenant=request.tenant,
        request_id=request.request_id, no_draft=bool(request.no_draft))


def validate(request: pb.GenerateRequest, model: "LoadedModel", settings: VerifierSettings) -> GenerationRequest:
    """The checked, tokenized request; raises InvalidArgument / FailedPrecondition."""
    return check(values_of(request), model, settings, GRPC_NAMES)


# ---------------------------------------------------------------- the core loop


@dataclass
class _Tally:
    """Sums over the steps of one generation."""

    steps: int = 0
    generated: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    draft_nodes: int = 0
    accepted: int = 0
    by_source: dict[int, int] = field(default_factory=dict)

    def add(self, step: StepResult) -> None:
        self.steps += 1
        self.draft_ns += step.draft_ns
        self.verify_ns += step.verify_ns
        self.draft_nodes += step.draft_nodes
        self.accepted += step.accepted_nodes
        for source in step.accepted_sources:
            self.by_source[int(source)] = self.by_source.get(int(source), 0) + 1

    def stats(self, prompt_tokens: int, wall_s: float) -> GenerationStats:
        return GenerationStats(prompt_tokens, self.generated, self.steps, self.generated / max(1, self.steps),
                               self.draft_ns / 1e9, self.verify_ns / 1e9, self.generated / max(wall_s, 1e-9),
                               dict(sorted(self.by_source.items())), self.draft_nodes, self.accepted, wall_s)


class _DeferredEnd:
    """A DraftSource whose `end()` waits for `finish`, which hands over the tokens not yet reported;
    steps without a draft are counted in `metrics` (timeouts seen through the session's `timeouts`,
    "denied" while the retriever refuses the session's credential: its `refused`)."""

    def __init__(self, session, metrics: VerifierMetrics | None = None) -> None:
        self._session, self.reported, self._metrics = session, 0, metrics

    def start(self, prompt_ids: list[int]) -> None:
        self._session.start(prompt_ids)

    def draft(self, new_tokens: list[int], max_nodes: int):
        self.reported += len(new_tokens)
        if self._metrics is None:
            return self._session.draft(new_tokens, max_nodes)
        timeouts = getattr(self._session, "timeouts", 0)
        try:
            draft = self._session.draft(new_tokens, max_nodes)
        except Exception:
            self._metrics.draft_fallback("error")
            raise
        if draft is None:
            refused = getattr(self._session, "refused", False)
            timed_out = getattr(self._session, "timeouts", 0) > timeouts
            self._metrics.draft_fallback("timeout" if timed_out else "denied" if refused else "none")
        return draft

    def end(self) -> None:
        pass

    def finish(self, output: Sequence[int]) -> None:
        self._session.end(list(output[self.reported:]))


def run(engine: Engine, request: GenerationRequest, drafter: "DraftSource | None",
        model: "LoadedModel", metrics: VerifierMetrics | None = None) -> Iterator[Chunk]:
    """Streams the generation's chunks; the last one carries finish_reason and stats. `metrics`:
    told of every step and of draft fallbacks."""
    t0 = time.perf_counter()
    stops = frozenset(model.eos_token_ids)
    stream = TextStream(_decoder(model.tokenizer), request.stops, stops)
    source = _DeferredEnd(drafter, metrics) if drafter is not None else None
    tally = _Tally()
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
    yield Chunk(tail, (), reason, tally.stats(len(request.prompt_ids), time.perf_counter() - t0))


def _decoder(tokenizer):
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return decode


# ---------------------------------------------------------------- the gRPC shell


def encode_chunk(chunk: Chunk) -> pb.GenerateResponse:
    response = pb.GenerateResponse(text=chunk.text, token_ids=list(chunk.token_ids))
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.stats is not None:
        s = chunk.stats
        response.stats.CopyFrom(pb.GenerateStats(
            prompt_tokens=s.prompt_tokens, new_tokens=s.new_tokens, steps=s.steps,
            mean_accepted_tokens=s.mean_accepted_tokens, draft_s=s.draft_s, verify_s=s.verify_s,
            tokens_per_s=s.tokens_per_s, draft_nodes=s.draft_nodes, accepted_draft_tokens=s.accepted_draft_tokens,
            wall_s=s.wall_s, accepted_by_source=[pb.SourceTokens(source=k, tokens=v)
                                                 for k, v in s.accepted_by_source.items()]))
    return response


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


class VerifierServicer(pb_grpc.VerifierServicer):
    """Generate: validate, then stream the generator's chunks."""

    def __init__(self, settings: VerifierSettings, generator: Generator, auth: ApiAuth | None = None) -> None:
        self._settings, self._generator, self._auth = settings, generator, auth or ApiAuth()

    def _checked(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> GenerationRequest:
        """The caller's checked request, its tenant the token's (raises the domain errors)."""
        values = values_of(request)
        try:
            principal = grpc_principal(self._auth, context.invocation_metadata())
            tenant = tenant_for(principal, values.tenant, self._settings.default_tenant, "tenant")
        except (errors.Unauthenticated, errors.PermissionDenied) as e:
            denied("grpc", "Generate", context.peer(), e)
            raise
        return check(dataclasses.replace(values, tenant=tenant), self._generator.model, self._settings, GRPC_NAMES)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        try:
            checked = self._checked(request, context)
        except errors.SpecdraftError as e:
            code, message = status_of(e)
            self._generator.metrics.rejected("grpc", code.name, reason_label(getattr(e, "param", None), code.name))
            context.abort(code, message)
        chunks = self._generator.stream(checked)
        try:
            for chunk in chunks:
                if not context.is_active():
                    return
                yield encode_chunk(chunk)
        finally:
            chunks.close()
