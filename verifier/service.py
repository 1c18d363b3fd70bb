"""The `specdraft.v1.Verifier` service: proto -> `validate` -> `run` (the core loop) -> proto.

- `validate(request, model, settings) -> GenerationRequest`: every field checked, the prompt
  tokenized (chat messages through the tokenizer's chat template); raises `InvalidArgument`
  (bad fields, prompt too long for the model) or `FailedPrecondition` (chat without a template).
- `run(engine, request, drafter, model) -> Iterator[Chunk]`: drives `Engine.generate`, streams
  text through `verifier.stops.TextStream` (stop strings, EOS, no split characters) and ends
  with a chunk carrying the finish reason and `GenerationStats`.
- `VerifierServicer`: the gRPC shell; generations run one at a time on the model; domain
  errors become status codes through `retriever.service.status_of` (the one mapping of
  `retriever.errors`), before any message is streamed.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import grpc

from protos.specdraft.v1 import verifier_pb2 as pb
from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from retriever import errors
from retriever.service import status_of
from verifier.engine import Engine, SamplingParams, StepResult
from verifier.settings import VerifierSettings
from verifier.stops import TextStream

if TYPE_CHECKING:
    from retriever.client import RetrieverClient
    from verifier.engine import DraftSource
    from verifier.model import LoadedModel

CHAT_ROLES = ("system", "user", "assistant")
_MAX_ID_BYTES = 128
_FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    stops: tuple[str, ...]
    tenant: str
    no_draft: bool
    request_id: str


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


def _fail(what: str, got: object) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{what}, got {got}")


def _prompt_ids(request: pb.GenerateRequest, model: "LoadedModel") -> list[int]:
    kind = request.WhichOneof("prompt")
    tok = model.tokenizer
    if kind == "text":
        if not request.text:
            raise _fail("text must be non-empty", "''")
        return list(tok.encode(request.text))
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if not ids or bad:
            raise _fail(f"token_ids must be a non-empty list of ids in [0, {model.vocab_size})",
                        f"{len(ids)} ids" if not bad else f"id {bad[0]}")
        return ids
    if kind == "chat":
        return _chat_ids(request.chat.messages, tok)
    raise _fail("prompt must be one of text, token_ids, chat", "none")


def _chat_ids(messages: Sequence[pb.ChatMessage], tok) -> list[int]:
    if not messages:
        raise _fail("chat.messages must be non-empty", "0 messages")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise _fail(f"chat.messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", repr(m.role))
    if not getattr(tok, "chat_template", None):
        raise errors.FailedPrecondition("the model's tokenizer must have a chat template for chat prompts, got none")
    text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                   add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


def _sampling(s: pb.SamplingParams, vocab_size: int) -> SamplingParams:
    if not (math.isfinite(s.temperature) and 0 <= s.temperature <= 100):
        raise _fail("sampling.temperature must be in [0, 100] (0 = greedy)", s.temperature)
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise _fail("sampling.top_p must be in (0, 1]", top_p)
    if s.top_k > vocab_size:
        raise _fail(f"sampling.top_k must be at most the vocabulary size {vocab_size} (0 = off)", s.top_k)
    if s.typical_acceptance and s.temperature == 0:
        raise _fail("sampling.typical_acceptance must be used with temperature > 0", "temperature 0")
    seed = s.seed if s.HasField("seed") else None
    return SamplingParams(temperature=float(s.temperature), top_p=float(top_p), top_k=int(s.top_k), seed=seed,
                          typical=bool(s.typical_acceptance))


def _stops(stops: Sequence[str], settings: VerifierSettings) -> tuple[str, ...]:
    if len(stops) > settings.max_stop_strings:
        raise _fail(f"sampling.stop must hold at most {settings.max_stop_strings} strings", len(stops))
    for i, s in enumerate(stops):
        if not 0 < len(s) <= settings.max_stop_chars:
            raise _fail(f"sampling.stop[{i}] must be 1 to {settings.max_stop_chars} characters", len(s))
    return tuple(stops)


def _max_new_tokens(requested: int, prompt_len: int, model: "LoadedModel", settings: VerifierSettings) -> int:
    room = model.max_positions - prompt_len
    if room < 1:
        raise _fail(f"prompt must be at most {model.max_positions - 1} tokens for this model", f"{prompt_len} tokens")
    if requested > settings.max_new_tokens_cap:
        raise _fail(f"sampling.max_new_tokens must be at most {settings.max_new_tokens_cap}", requested)
    if requested > room:
        raise _fail(f"sampling.max_new_tokens must be at most {room} for a {prompt_len}-token prompt "
                    f"(the model holds {model.max_positions} positions)", requested)
    return requested or min(settings.default_max_new_tokens, room)


def _name(value: str, what: str, default: str) -> str:
    if len(value.encode()) > _MAX_ID_BYTES:
        raise _fail(f"{what} must be at most {_MAX_ID_BYTES} bytes", f"{len(value.encode())} bytes")
    return value or default


def validate(request: pb.GenerateRequest, model: "LoadedModel", settings: VerifierSettings) -> GenerationRequest:
    """The checked, tokenized request; raises InvalidArgument / FailedPrecondition."""
    tenant = _name(request.tenant, "tenant", settings.default_tenant)
    request_id = _name(request.request_id, "request_id", uuid.uuid4().hex)
    sampling = _sampling(request.sampling, model.vocab_size)
    stops = _stops(request.sampling.stop, settings)
    ids = _prompt_ids(request, model)
    max_new = _max_new_tokens(request.sampling.max_new_tokens, len(ids), model, settings)
    return GenerationRequest(tuple(ids), sampling, max_new, stops, tenant, request.no_draft, request_id)


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
    """A DraftSource whose `end()` waits for `finish`, which hands over the tokens not yet reported."""

    def __init__(self, session) -> None:
        self._session, self.reported = session, 0

    def start(self, prompt_ids: list[int]) -> None:
        self._session.start(prompt_ids)

    def draft(self, new_tokens: list[int], max_nodes: int):
        self.reported += len(new_tokens)
        return self._session.draft(new_tokens, max_nodes)

    def end(self) -> None:
        pass

    def finish(self, output: Sequence[int]) -> None:
        self._session.end(list(output[self.reported:]))


def run(engine: Engine, request: GenerationRequest, drafter: "DraftSource | None",
        model: "LoadedModel") -> Iterator[Chunk]:
    """Streams the generation's chunks; the last one carries finish_reason and stats."""
    t0 = time.perf_counter()
    stops = frozenset(model.eos_token_ids)
    stream = TextStream(_decoder(model.tokenizer), request.stops, stops)
    source = _DeferredEnd(drafter) if drafter is not None else None
    tally = _Tally()
    steps = engine.generate(list(request.prompt_ids), request.max_new_tokens, request.sampling, source, list(stops))
    try:
        for step in steps:
            tally.add(step)
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


class VerifierServicer(pb_grpc.VerifierServicer):
    """Generate: validate, then stream `run`'s chunks; one generation at a time on the model."""

    def __init__(self, settings: VerifierSettings, model: "LoadedModel", engine: Engine,
                 retriever: "RetrieverClient | None") -> None:
        self._settings, self._model, self._engine, self._retriever = settings, model, engine, retriever
        self._lock = threading.Lock()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        try:
            checked = validate(request, self._model, self._settings)
        except errors.SpecdraftError as e:
            context.abort(*status_of(e))
        with self._lock:
            drafter = None
            if self._retriever is not None and not checked.no_draft:
                drafter = self._retriever.session(checked.tenant, checked.request_id)
            chunks = run(self._engine, checked, drafter, self._model)
            try:
                for chunk in chunks:
                    if not context.is_active():
                        return
                    yield encode_chunk(chunk)
            finally:
                chunks.close()
