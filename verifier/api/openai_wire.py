"""The OpenAI wire format on plain values: request JSON -> `OpenAIRequest`, chunks -> response JSON.

Pure (no HTTP framework, no model): `parse(kind, body, tenant_header)` type-checks the JSON body
of `/v1/completions` (kind "completion") or `/v1/chat/completions` (kind "chat") into
`RequestValues` (the rules on values are `verifier.api.requests.check`'s, with `NAMES[kind]`), and
raises `ApiError` (OpenAI's error JSON and its HTTP status) on a malformed or unsupported field
(a string holding a lone surrogate, e.g. JSON's `"\\ud800"`, is a 400 naming its field).
`Formatter` turns `verifier.api.generation.Chunk`s into response objects and stream chunks.

Defaults follow OpenAI: temperature 1, top_p 1, completions max_tokens 16 (chat: the server's
default, capped by the model's window). Extensions: `top_k` (0 or -1 = off), `no_draft`, and a
`specdraft` object (the verifier's stats) in the response / the stream chunk with finish_reason.
`prediction` (Predicted Outputs, both kinds): {"type": "content", "content": a string or a list of
text parts}; the usage then holds `completion_tokens_details.accepted_prediction_tokens` /
`rejected_prediction_tokens` (counted as `verifier.api.prediction` says). `suffix` (completions
only): fill-in-the-middle (`verifier.api.fim`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from retriever import errors
from retriever.status import status_of
from verifier.api.requests import MAX_ID_BYTES, ChatMessage, FieldNames, RequestValues
from verifier.decoding.stats import source_name

if TYPE_CHECKING:
    from verifier.api.generation import Chunk
    from verifier.decoding.stats import GenerationStats

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_NAMES_COMMON = dict(temperature="temperature", top_p="top_p", top_k="top_k", typical="typical_acceptance",
                     stop="stop", tenant="user", request_id="request_id")
NAMES = {
    "completion": FieldNames(prompt_kinds="prompt", prompt="prompt", text="prompt", token_ids="prompt",
                             messages="prompt", max_new_tokens="max_tokens", **_NAMES_COMMON),
    "chat": FieldNames(prompt_kinds="messages", prompt="messages", text="messages", token_ids="messages",
                       messages="messages", max_new_tokens="max_tokens", **_NAMES_COMMON),
}
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
# fields that change the output: accepted only at their neutral value
_NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
            "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
            "presence_penalty": (None, 0),
            "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
            "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: `body()` is {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, error: errors.SpecdraftError, param: str | None = None, code: str | None = None) -> "ApiError":
        """A domain error as its HTTP status and OpenAI type (the one table, `retriever.status`)."""
        status = status_of(error)
        return cls(status.http, str(error), status.openai_type, param, code)


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    model: str | None  # None: the served model
    values: RequestValues
    stream: bool
    include_usage: bool  # stream_options.include_usage


def show(value: object) -> str:
    """A short rendering of a client's value for "got Z" (strings cut at 40 characters)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else repr(value).lower() if isinstance(value, bool) else repr(value)


def _bad(param: str, what: str, value: object) -> ApiError:
    return ApiError(400, f"{param} must be {what}, got {show(value)}", param=param)


def _unicode(param: str, v: str) -> str:
    """`v` when UTF-8 can encode it; ApiError 400 naming `param` at its first lone surrogate
    (JSON's `"\\ud800"` escapes decode to those, and no tokenizer or response can take them)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param} must be valid Unicode text, got a lone surrogate at character {e.start}",
                       param=param) from None
    return v


def _number(body: Mapping, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(key, "a number", v)
    return float(v)


def _integer(body: Mapping, key: str, default: int | None, lo: int = -(1 << 63), hi: int = 1 << 64) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise _bad(key, f"an integer in [{lo}, {hi})" if lo > -(1 << 63) else "an integer", v)
    return v


def _boolean(body: Mapping, key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise _bad(key, "a boolean", v)
    return bool(v)


def _string(body: Mapping, key: str) -> str:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(key, "a string", v)
    return _unicode(key, v or "")


def _stops(body: Mapping) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (_unicode("stop", v),)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(_unicode(f"stop[{i}]", s) for i, s in enumerate(v))
    raise _bad("stop", "a string or a list of strings", v)


def _is_ids(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompt(body: Mapping) -> dict:
    v = body.get("prompt")
    if isinstance(v, list) and len(v) == 1 and (isinstance(v[0], str) or _is_ids(v[0])):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        return {"text": _unicode("prompt", v)}
    if _is_ids(v):
        return {"token_ids": tuple(v)}
    raise _bad("prompt", "a string, a list of token ids, or a list of one of those (batches are not supported)", v)


def _content(m: Mapping, i: int) -> str:
    c = m.get("content")
    if c is None or isinstance(c, str):
        return _unicode(f"messages[{i}].content", c or "")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(_unicode(f"messages[{i}].content[{j}].text", p["text"]) for j, p in enumerate(c))
    raise _bad(f"messages[{i}].content", "a string or a list of text parts", c)


def _messages(body: Mapping) -> dict:
    v = body.get("messages")
    if not isinstance(v, list):
        raise _bad("messages", "a list of messages", v)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", 'an object with a string "role"', m)
        role = _unicode(f"messages[{i}].role", "system" if m["role"] == "developer" else m["role"])
        out.append(ChatMessage(role, _content(m, i)))
    return {"messages": tuple(out)}


def _prediction(body: Mapping) -> str:
    """The prediction's text ("" = none); ApiError 400 on any other shape."""
    v = body.get("prediction")
    if v is None:
        return ""
    what = '{"type": "content", "content": a string or a list of text parts}'
    if not isinstance(v, dict) or v.get("type") != "content":
        raise _bad("prediction", what, v)
    c = v.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise _bad("prediction.content", "a string or a list of text parts", c)


def _suffix(body: Mapping, kind: str) -> str:
    v = body.get("suffix")
    if kind == "chat" and v not in (None, ""):
        raise ApiError(400, f'suffix must be null or "" on chat completions (not supported), got {show(v)}',
                       param="suffix", code="unsupported_parameter")
    return _string(body, "suffix")


def _is(value: object, neutral: object) -> bool:
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    return not isinstance(value, bool) and type(value) in (type(neutral), int, float) and value == neutral


def _check_neutral(body: Mapping) -> None:
    for key, neutral in _NEUTRAL.items():
        if key in body and not any(_is(body[key], n) for n in neutral):
            allowed = " or ".join(json.dumps(n) for n in neutral)
            raise ApiError(400, f"{key} must be {allowed} (not supported), got {show(body[key])}", param=key,
                           code="unsupported_parameter")


def _max_tokens(body: Mapping, kind: str) -> int:
    keys = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    for key in keys:
        n = _integer(body, key, None)
        if n is not None:
            if n < 1:
                raise _bad(key, "an integer >= 1", n)
            return n
    return COMPLETIONS_MAX_TOKENS if kind == "completion" else 0


def _stream_options(body: Mapping, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "an object", opts)
    if not stream:
        raise ApiError(400, "stream_options must be null when stream is false, got an object", param="stream_options")
    return _boolean(opts, "include_usage")


def parse(kind: str, body: object, tenant_header: str = "") -> OpenAIRequest:
    """The request's values (field types checked, not yet the rules of `check`); raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {show(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "a string", model)
    if model is not None:
        _unicode("model", model)
    _check_neutral(body)
    if len(tenant_header.encode()) > MAX_ID_BYTES:
        raise ApiError(400, f"the X-Specdraft-Tenant header must be at most {MAX_ID_BYTES} bytes, got "
                       f"{len(tenant_header.encode())} bytes")
    top_k = _integer(body, "top_k", 0)
    values = RequestValues(
        **(_prompt(body) if kind == "completion" else _messages(body)),
        temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k, seed=_integer(body, "seed", None),
        max_new_tokens=_max_tokens(body, kind), stops=_stops(body),
        tenant=tenant_header or _string(body, "user"), no_draft=_boolean(body, "no_draft"),
        prediction=_prediction(body), suffix=_suffix(body, kind))
    stream = _boolean(body, "stream")
    return OpenAIRequest(kind, model, values, stream, _stream_options(body, stream))


# ---------------------------------------------------------------- responses


def usage(stats: "GenerationStats", prediction: tuple[int, int] | None = None) -> dict:
    """completion_tokens: the tokens generated up to the stop (an EOS token included); with a
    prediction, `completion_tokens_details` holds its (accepted, rejected) tokens."""
    out = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
           "total_tokens": stats.prompt_tokens + stats.new_tokens}
    if prediction is not None:
        out["completion_tokens_details"] = {"accepted_prediction_tokens": prediction[0],
                                            "rejected_prediction_tokens": prediction[1]}
    return out


def specdraft_stats(stats: "GenerationStats", tenant: str) -> dict:
    """The `specdraft` extension object: the verifier's own stats of the generation."""
    by_source = {source_name(k): v for k, v in stats.accepted_by_source.items()}
    return {"mean_accepted_tokens": stats.mean_accepted_tokens, "steps": stats.steps,
            "tokens_per_s": stats.tokens_per_s, "accepted_by_source": by_source, "draft_nodes": stats.draft_nodes,
            "accepted_draft_tokens": stats.accepted_draft_tokens, "draft_s": stats.draft_s,
            "verify_s": stats.verify_s, "wall_s": stats.wall_s, "tenant": tenant}


@dataclass(frozen=True)
class Formatter:
    """Response objects of one request, all with the same id and `created`."""

    kind: str  # "completion" | "chat"
    model: str
    tenant: str
    id: str
    created: int
    include_usage: bool = False
    done = "data: [DONE]\n\n"  # the stream's last event

    def error(self, error: ApiError) -> dict:
        """An error event of the stream (after its status was sent)."""
        return error.body()

    @classmethod
    def new(cls, kind: str, model: str, tenant: str, include_usage: bool = False) -> "Formatter":
        prefix = "cmpl-" if kind == "completion" else "chatcmpl-"
        return cls(kind, model, tenant, prefix + uuid.uuid4().hex, int(time.time()), include_usage)

    def _head(self, stream: bool) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk" if stream \
            else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def response(self, text: str, last: "Chunk") -> dict:
        """The non-streamed response; `last` is the generation's final chunk."""
        choice = {"index": 0, "logprobs": None, "finish_reason": _FINISH[last.finish_reason]}
        if self.kind == "completion":
            choice["text"] = text
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return {**self._head(False), "choices": [choice], "usage": usage(last.stats, last.prediction),
                "specdraft": specdraft_stats(last.stats, self.tenant)}

    def _chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.kind == "completion":
            choice["text"] = text or ""
        else:
            choice["delta"] = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        out = {**self._head(True), "choices": [choice]}
        return out | {"usage": None} if self.include_usage else out

    def opening(self) -> list[dict]:
        """Chunks before the first token (chat: the assistant role)."""
        return [self._chunk("", None, role=True)] if self.kind == "chat" else []

    def chunks(self, chunk: "Chunk") -> list[dict]:
        """Stream chunks for one generation chunk; the last one ends with finish_reason (+ usage)."""
        if chunk.finish_reason is None:
            return [self._chunk(chunk.text, None)] if chunk.text else []
        final = self._chunk(chunk.text or None, _FINISH[chunk.finish_reason])
        final["specdraft"] = specdraft_stats(chunk.stats, self.tenant)
        if not self.include_usage:
            return [final]
        return [final, {**self._head(True), "choices": [], "usage": usage(chunk.stats, chunk.prediction)}]
