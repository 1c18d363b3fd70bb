"""The OpenAI wire format on plain values: request JSON -> `OpenAIRequest`, chunks -> response JSON.

Pure (no HTTP framework, no model): `parse(kind, body, header)` (header: X-Specdraft-Tenant's
value) type-checks the JSON body (with `verifier.api.json_fields`' readers) of `/v1/completions`
(kind "completion") or `/v1/chat/completions` (kind "chat") into `RequestValues` (the rules on values are `verifier.api.requests.check`'s, with `NAMES[kind]`), and
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

from verifier.api.json_fields import (ApiError, bad, boolean, integer, json_object, number, show, stops, string,
                                      tenant_header, unicode_text)
from verifier.api.requests import ChatMessage, FieldNames, RequestValues
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


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    model: str | None  # None: the served model
    values: RequestValues
    stream: bool
    include_usage: bool  # stream_options.include_usage


def _is_ids(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompt(body: Mapping) -> dict:
    v = body.get("prompt")
    if isinstance(v, list) and len(v) == 1 and (isinstance(v[0], str) or _is_ids(v[0])):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        return {"text": unicode_text("prompt", v)}
    if _is_ids(v):
        return {"token_ids": tuple(v)}
    raise bad("prompt", "a string, a list of token ids, or a list of one of those (batches are not supported)", v)


def _content(m: Mapping, i: int) -> str:
    c = m.get("content")
    if c is None or isinstance(c, str):
        return unicode_text(f"messages[{i}].content", c or "")
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(unicode_text(f"messages[{i}].content[{j}].text", p["text"]) for j, p in enumerate(c))
    raise bad(f"messages[{i}].content", "a string or a list of text parts", c)


def _messages(body: Mapping) -> dict:
    v = body.get("messages")
    if not isinstance(v, list):
        raise bad("messages", "a list of messages", v)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", 'an object with a string "role"', m)
        role = unicode_text(f"messages[{i}].role", "system" if m["role"] == "developer" else m["role"])
        out.append(ChatMessage(role, _content(m, i)))
    return {"messages": tuple(out)}


def _prediction(body: Mapping) -> str:
    """The prediction's text ("" = none); ApiError 400 on any other shape."""
    v = body.get("prediction")
    if v is None:
        return ""
    what = '{"type": "content", "content": a string or a list of text parts}'
    if not isinstance(v, dict) or v.get("type") != "content":
        raise bad("prediction", what, v)
    c = v.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise bad("prediction.content", "a string or a list of text parts", c)


def _suffix(body: Mapping, kind: str) -> str:
    v = body.get("suffix")
    if kind == "chat" and v not in (None, ""):
        raise ApiError(400, f'suffix must be null or "" on chat completions (not supported), got {show(v)}',
                       param="suffix", code="unsupported_parameter")
    return string(body, "suffix")


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
        n = integer(body, key, None)
        if n is not None:
            if n < 1:
                raise bad(key, "an integer >= 1", n)
            return n
    return COMPLETIONS_MAX_TOKENS if kind == "completion" else 0


def _stream_options(body: Mapping, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad("stream_options", "an object", opts)
    if not stream:
        raise ApiError(400, "stream_options must be null when stream is false, got an object", param="stream_options")
    return boolean(opts, "include_usage")


def parse(kind: str, body: object, header: str = "") -> OpenAIRequest:
    """The request's values (field types checked, not yet the rules of `check`); raises ApiError."""
    body = json_object(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "a string", model)
    if model is not None:
        unicode_text("model", model)
    _check_neutral(body)
    tenant = tenant_header(header)
    top_k = integer(body, "top_k", 0)
    values = RequestValues(
        **(_prompt(body) if kind == "completion" else _messages(body)),
        temperature=number(body, "temperature", 1.0), top_p=number(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k, seed=integer(body, "seed", None),
        max_new_tokens=_max_tokens(body, kind), stops=stops(body),
        tenant=tenant or string(body, "user"), no_draft=boolean(body, "no_draft"),
        prediction=_prediction(body), suffix=_suffix(body, kind))
    stream = boolean(body, "stream")
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
