"""The rules of a generation request, on plain values: `check(values, model, settings, names)`.

Pure (no grpc, no HTTP): the gRPC shell (`verifier.api.generation.validate`) and the OpenAI HTTP
API (`verifier.api.openai_wire`) both turn their wire format into a `RequestValues` and call
`check`, so every rule lives here once. Errors name the field as the caller's wire format
spells it (`FieldNames`): `InvalidField` (an `errors.InvalidArgument`) carries that name as
`param` and, for prompts that do not fit the model, the code "context_length_exceeded";
`errors.FailedPrecondition` for chat prompts on a model without a chat template.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from retriever import errors
from verifier.api.fim import extra_context, fim_prompt, fim_tokens
from verifier.api.settings import VerifierSettings
from verifier.decoding.accept import SamplingParams

if TYPE_CHECKING:
    from verifier.decoding.backend import Backend

CHAT_ROLES = ("system", "user", "assistant")
MAX_ID_BYTES = 128
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class InvalidField(errors.InvalidArgument):
    """A field breaks a rule; `param` is the field as the wire format names it."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class FieldNames:
    """How a wire format spells each field, for error messages."""

    prompt_kinds: str = "text, token_ids, chat"  # "prompt must be one of ..."
    prompt: str | None = None  # the prompt's field, if it has one
    text: str = "text"
    token_ids: str = "token_ids"
    messages: str = "chat.messages"
    temperature: str = "sampling.temperature"
    top_p: str = "sampling.top_p"
    top_k: str = "sampling.top_k"
    typical: str = "sampling.typical_acceptance"
    max_new_tokens: str = "sampling.max_new_tokens"
    stop: str = "sampling.stop"
    tenant: str = "tenant"
    request_id: str = "request_id"
    prediction: str = "prediction"
    suffix: str = "suffix"


GRPC_NAMES = FieldNames()


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class RequestValues:
    """One request as plain values; exactly one of text, token_ids, messages is set."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    typical: bool = False
    max_new_tokens: int = 0  # 0 = settings.default_max_new_tokens (within the model's window)
    stops: tuple[str, ...] = ()
    tenant: str = ""  # "" = settings.default_tenant
    request_id: str = ""  # "" = a fresh one
    no_draft: bool = False
    prediction: str = ""  # the predicted output (OpenAI Predicted Outputs); "" = none
    suffix: str = ""  # fill-in-the-middle: the text after the completion (text prompts only); "" = none
    fim: bool = False  # a FIM prompt even with an empty suffix (llama.cpp's /infill)
    fim_extra: tuple[tuple[str, str], ...] = ()  # FIM: (filename, text) of other files, before the prompt
    min_indent: int = 0  # llama.cpp's n_indent (`verifier.api.stops.LineLimits`); 0 = off
    line_time_limit_s: float = 0.0  # llama.cpp's t_max_predict_ms in s (`LineLimits`); 0 = off


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    stops: tuple[str, ...]
    tenant: str
    no_draft: bool
    request_id: str
    prediction_ids: tuple[int, ...] = ()  # the predicted output's tokens (a draft source); () = none
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the generation besides EOS (FIM: the middle's ends)
    min_indent: int = 0  # as RequestValues'
    line_time_limit_s: float = 0.0  # as RequestValues'


def _fail(what: str, got: object, param: str | None = None, code: str | None = None) -> InvalidField:
    return InvalidField(f"{what}, got {got}", param, code)


def _fim_ids(v: RequestValues, model: "Backend", settings: VerifierSettings, n: FieldNames) -> tuple[list[int], tuple]:
    """The FIM prompt of a text prompt with a suffix and the tokens that end its middle; the extra
    context (if any) is cut from the front to leave room for the requested (or default) tokens."""
    if v.text is None:
        raise _fail(f"{n.suffix} must come with a text prompt", "another prompt kind", n.suffix)
    tokens = fim_tokens(model.tokenizer)
    if tokens is None:
        raise InvalidField(f"model {settings.model_name} has no fill-in-the-middle tokens", n.suffix)
    ids = fim_prompt(tokens, model.tokenizer, v.text, v.suffix)
    if v.fim or v.fim_extra:
        room = model.max_positions - len(ids) - max(1, v.max_new_tokens or settings.default_max_new_tokens)
        ids = extra_context(tokens, model.tokenizer, v.fim_extra, max(0, room)) + ids
    return ids, tokens.end_ids


def _prediction_ids(v: RequestValues, model: "Backend", n: FieldNames) -> tuple[int, ...]:
    """The prediction's tokens, with the prompt's limit (at most max_positions - 1 tokens)."""
    if not v.prediction:
        return ()
    ids = tuple(model.tokenizer.encode(v.prediction, add_special_tokens=False))
    if len(ids) > model.max_positions - 1:
        raise _fail(f"{n.prediction} must be at most {model.max_positions - 1} tokens for this model",
                    f"{len(ids)} tokens", n.prediction, CONTEXT_LENGTH_EXCEEDED)
    return ids


def _prompt_ids(v: RequestValues, model: "Backend", n: FieldNames) -> list[int]:
    tok = model.tokenizer
    if v.text is not None:
        if not v.text:
            raise _fail(f"{n.text} must be non-empty", "''", n.text)
        return list(tok.encode(v.text))
    if v.token_ids is not None:
        ids = list(v.token_ids)
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if not ids or bad:
            raise _fail(f"{n.token_ids} must be a non-empty list of ids in [0, {model.vocab_size})",
                        f"{len(ids)} ids" if not bad else f"id {bad[0]}", n.token_ids)
        return ids
    if v.messages is not None:
        return _chat_ids(v.messages, tok, n)
    raise _fail(f"prompt must be one of {n.prompt_kinds}", "none", n.prompt)


def _chat_ids(messages: tuple[ChatMessage, ...], tok, n: FieldNames) -> list[int]:
    if not messages:
        raise _fail(f"{n.messages} must be non-empty", "0 messages", n.messages)
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise _fail(f"{n.messages}[{i}].role must be one of {', '.join(CHAT_ROLES)}", repr(m.role), n.messages)
    if not getattr(tok, "chat_template", None):
        raise errors.FailedPrecondition("the model's tokenizer must have a chat template for chat prompts, got none")
    text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                   add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


def _sampling(v: RequestValues, vocab_size: int, n: FieldNames) -> SamplingParams:
    if not (math.isfinite(v.temperature) and 0 <= v.temperature <= 100):
        raise _fail(f"{n.temperature} must be in [0, 100] (0 = greedy)", v.temperature, n.temperature)
    if not (math.isfinite(v.top_p) and 0 < v.top_p <= 1):
        raise _fail(f"{n.top_p} must be in (0, 1]", v.top_p, n.top_p)
    if v.top_k > vocab_size:
        raise _fail(f"{n.top_k} must be at most the vocabulary size {vocab_size} (0 = off)", v.top_k, n.top_k)
    if v.top_k < 0:
        raise _fail(f"{n.top_k} must be >= 0 (0 = off)", v.top_k, n.top_k)
    if v.typical and v.temperature == 0:
        raise _fail(f"{n.typical} must be used with temperature > 0", "temperature 0", n.typical)
    return SamplingParams(temperature=float(v.temperature), top_p=float(v.top_p), top_k=int(v.top_k), seed=v.seed,
                          typical=bool(v.typical))


def _stops(stops: tuple[str, ...], settings: VerifierSettings, n: FieldNames) -> tuple[str, ...]:
    if len(stops) > settings.max_stop_strings:
        raise _fail(f"{n.stop} must hold at most {settings.max_stop_strings} strings", len(stops), n.stop)
    for i, s in enumerate(stops):
        if not 0 < len(s) <= settings.max_stop_chars:
            raise _fail(f"{n.stop}[{i}] must be 1 to {settings.max_stop_chars} characters", len(s), n.stop)
    return tuple(stops)


def _max_new_tokens(requested: int, prompt_len: int, model: "Backend", settings: VerifierSettings,
                    n: FieldNames) -> int:
    room = model.max_positions - prompt_len
    if room < 1:
        raise _fail(f"prompt must be at most {model.max_positions - 1} tokens for this model", f"{prompt_len} tokens",
                    n.prompt, CONTEXT_LENGTH_EXCEEDED)
    if requested < 0:
        raise _fail(f"{n.max_new_tokens} must be >= 0 (0 = the default)", requested, n.max_new_tokens)
    if requested > settings.max_new_tokens_cap:
        raise _fail(f"{n.max_new_tokens} must be at most {settings.max_new_tokens_cap}", requested, n.max_new_tokens)
    if requested > room:
        raise _fail(f"{n.max_new_tokens} must be at most {room} for a {prompt_len}-token prompt "
                    f"(the model holds {model.max_positions} positions)", requested, n.max_new_tokens,
                    CONTEXT_LENGTH_EXCEEDED)
    return requested or min(settings.default_max_new_tokens, room)


def _name(value: str, what: str, default: str) -> str:
    if len(value.encode()) > MAX_ID_BYTES:
        raise _fail(f"{what} must be at most {MAX_ID_BYTES} bytes", f"{len(value.encode())} bytes", what)
    return value or default


def check(values: RequestValues, model: "Backend", settings: VerifierSettings,
          names: FieldNames = GRPC_NAMES) -> GenerationRequest:
    """The checked, tokenized request; raises InvalidField / FailedPrecondition."""
    tenant = _name(values.tenant, names.tenant, settings.default_tenant)
    request_id = _name(values.request_id, names.request_id, uuid.uuid4().hex)
    sampling = _sampling(values, model.vocab_size, names)
    stops = _stops(values.stops, settings, names)
    end_ids: tuple[int, ...] = ()
    if values.suffix or values.fim:  # the prefix may be empty (a cursor at the file's start)
        ids, end_ids = _fim_ids(values, model, settings, names)
    else:
        ids = _prompt_ids(values, model, names)
    max_new = _max_new_tokens(values.max_new_tokens, len(ids), model, settings, names)
    prediction = _prediction_ids(values, model, names)
    return GenerationRequest(tuple(ids), sampling, max_new, stops, tenant, values.no_draft, request_id, prediction,
                             end_ids, values.min_indent, values.line_time_limit_s)
