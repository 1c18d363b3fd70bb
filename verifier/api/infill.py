"""llama.cpp's `/infill` wire format on plain values (what llama.vscode and llama.vim send for FIM).

Pure (no HTTP framework, no model): `parse_infill(body, header)` (header: X-Specdraft-Tenant's
value) type-checks the JSON body (with `verifier.api.json_fields`' readers) into `InfillRequest`
(its `values` go through `verifier.api.requests.check` with `INFILL_NAMES`, like the OpenAI
routes'), raising `ApiError` on a malformed field; `InfillFormatter` turns
`verifier.api.generation.Chunk`s into llama.cpp's response objects; `error_body` is llama.cpp's
error JSON `{"error": {"code", "message", "type"}}` (status and type from `retriever.status`).

The prompt (`verifier.api.fim`): the repo-level context of `input_extra`, then
P `input_prefix` + `prompt` S `input_suffix` M, as llama.cpp's `format_infill` lays it out (its
`prompt`, the cursor line's text before the cursor, continues the prefix before S; it is encoded
together with `input_prefix` here). Honored: `input_prefix`, `input_suffix` (both required
strings, may be empty), `prompt`, `input_extra` ([{"filename", "text"}]; cut from the front to fit
the model's window), `n_predict` (alias `max_tokens`; -1 or absent: the server's default; 0: the
prompt is checked and an empty completion answered at once, nothing generated: llama.vscode sends
it to warm a prompt cache this server does not keep), `temperature` (default 0.8, <= 0 greedy),
`top_k` (default 40, <= 0 off), `top_p` (default 0.95), `seed` (-1: random), `stop`, `stream`,
`samplers` (a list without "temperature" / "top_k" / "top_p" turns that step off, as in
llama.cpp's sampler chain; its other samplers, e.g. "infill", are not applied), `n_indent` (an
integer >= 0: a generated line indented less ends the completion before it, blank lines too) and
`t_max_predict_ms` (an integer >= -1, 0 / -1 off: a newline generated that long after the first
token ends it), as llama.cpp applies them (`verifier.api.stops.LineLimits`; stop_type "limit").
Ignored (accepted with any value): `model` (one model is served), `cache_prompt` (no prompt
cache is kept), `id_slot`, `n_cmpl`, `t_max_prompt_ms` (llama.cpp does not apply it either),
`lora` (no adapters are served), penalties and every other `/completion` option. The tenant is
the `X-Specdraft-Tenant` header's (or the token's).

Response: {"content", "stop": true, "stop_type": "eos" | "word" | "limit", "tokens_predicted",
"tokens_evaluated", "tokens_cached": 0, "truncated": false, "generation_settings", "timings":
{prompt_n, prompt_ms, ..., predicted_n, predicted_ms, predicted_per_token_ms, predicted_per_second},
"specdraft": the verifier's stats}; `timings.prompt_ms` is 0: the prompt's forward is timed inside
`predicted_ms` (the wall time of the whole generation). Streamed: events `data: {"content",
"tokens", "stop": false, ...}`, the last one that object with `"stop": true` (its content the text
not sent yet), and no `[DONE]`, as llama.cpp streams.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from verifier.api.json_fields import (ApiError, bad, boolean, integer, json_object, number, stops, tenant_header,
                                      unicode_text)
from verifier.api.openai_wire import specdraft_stats
from verifier.api.requests import FieldNames, RequestValues

if TYPE_CHECKING:
    from verifier.api.generation import Chunk
    from verifier.api.requests import GenerationRequest
    from verifier.decoding.stats import GenerationStats

INFILL_NAMES = FieldNames(prompt_kinds="input_prefix", prompt="input_prefix", text="input_prefix",
                          token_ids="input_prefix", messages="input_prefix", temperature="temperature",
                          top_p="top_p", top_k="top_k", typical="typical_p", max_new_tokens="n_predict",
                          stop="stop", tenant="X-Specdraft-Tenant", request_id="id", suffix="input_suffix")
# llama.cpp's /completion defaults
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 0.8, 40, 0.95
_STOP_TYPE = {"eos": "eos", "stop": "word", "length": "limit"}
_EXTRA = 'an array of {"filename": string, "text": string}'


@dataclass(frozen=True)
class InfillRequest:
    values: RequestValues
    stream: bool
    n_predict: int  # as sent: -1 = the server's default, 0 = no generation (a warm-up)


def _text(body: Mapping, key: str, required: bool) -> str:
    v = body.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise bad(key, "a string", v)
    return unicode_text(key, v)


def _extra(body: Mapping) -> tuple[tuple[str, str], ...]:
    v = body.get("input_extra")
    if v is None:
        return ()
    if not isinstance(v, list):
        raise bad("input_extra", _EXTRA, v)
    out = []
    for i, chunk in enumerate(v):
        if not isinstance(chunk, dict):
            raise bad(f"input_extra[{i}]", '{"filename": string, "text": string}', chunk)
        out.append((_text(chunk, "filename", False) or "tmp", _text(chunk, "text", True)))
    return tuple(out)


def _samplers(body: Mapping) -> frozenset[str] | None:
    v = body.get("samplers")
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("samplers", "a list of sampler names", v)
    return frozenset(v)


def _n_predict(body: Mapping) -> int:
    key = "n_predict" if body.get("n_predict") is not None else "max_tokens"
    n = integer(body, key, -1)
    if n < -1:
        raise bad(key, "an integer >= -1 (-1 = the server's default)", n)
    return n


def _line_limits(body: Mapping) -> dict:
    """n_indent and t_max_predict_ms as RequestValues' min_indent and line_time_limit_s."""
    n_indent = integer(body, "n_indent", 0)
    if n_indent < 0:
        raise bad("n_indent", "an integer >= 0 (0 = no indentation limit)", n_indent)
    t_ms = integer(body, "t_max_predict_ms", 0)
    if t_ms < -1:
        raise bad("t_max_predict_ms", "an integer >= -1 (0 or -1 = no time limit)", t_ms)
    return {"min_indent": n_indent, "line_time_limit_s": max(0, t_ms) / 1000.0}


def parse_infill(body: object, header: str = "") -> InfillRequest:
    """The request's values (field types checked, not yet the rules of `check`); raises ApiError."""
    body = json_object(body)
    tenant = tenant_header(header)
    samplers = _samplers(body)
    on = (lambda step: samplers is None or step in samplers)  # noqa: E731
    temperature = max(0.0, number(body, "temperature", DEFAULT_TEMPERATURE)) if on("temperature") else 1.0
    top_k = integer(body, "top_k", DEFAULT_TOP_K) if on("top_k") else 0
    seed = integer(body, "seed", None)
    n_predict = _n_predict(body)
    values = RequestValues(
        text=_text(body, "input_prefix", True) + _text(body, "prompt", False),
        suffix=_text(body, "input_suffix", True), fim=True, fim_extra=_extra(body),
        temperature=temperature, top_p=number(body, "top_p", DEFAULT_TOP_P) if on("top_p") else 1.0,
        top_k=max(0, top_k), seed=None if seed == -1 else seed, max_new_tokens=max(0, n_predict),
        stops=stops(body), tenant=tenant, **_line_limits(body))
    return InfillRequest(values, boolean(body, "stream"), n_predict)


def error_body(error: ApiError) -> dict:
    """llama.cpp's error JSON for an ApiError (its HTTP status as `code`)."""
    return {"error": {"code": error.status, "message": error.message, "type": error.type}}


def timings(stats: "GenerationStats") -> dict:
    """llama.cpp's `timings` (ms); the prompt's forward is inside predicted_ms (prompt_ms 0)."""
    ms = stats.wall_s * 1000.0
    n = stats.new_tokens
    return {"prompt_n": stats.prompt_tokens, "prompt_ms": 0.0, "prompt_per_token_ms": 0.0, "prompt_per_second": 0.0,
            "predicted_n": n, "predicted_ms": ms, "predicted_per_token_ms": ms / n if n else 0.0,
            "predicted_per_second": n / stats.wall_s if n and stats.wall_s > 0 else 0.0}


@dataclass(frozen=True)
class InfillFormatter:
    """llama.cpp's response objects of one /infill request (the interface of `openai_wire.Formatter`)."""

    model: str
    tenant: str
    id: str
    prompt_tokens: int
    settings: dict  # generation_settings
    done = None  # no end-of-stream marker after the last event

    @classmethod
    def new(cls, model: str, request: "GenerationRequest", n_ctx: int) -> "InfillFormatter":
        s = request.sampling
        settings = {"n_ctx": n_ctx, "n_predict": request.max_new_tokens, "temperature": s.temperature,
                    "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed, "stop": list(request.stops), "model": model,
                    "n_indent": request.min_indent, "t_max_predict_ms": round(request.line_time_limit_s * 1000)}
        return cls(model, request.tenant, "infill-" + uuid.uuid4().hex, len(request.prompt_ids), settings)

    def _final(self, content: str, stop_type: str, predicted: int, extra: dict) -> dict:
        return {"index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True, "model": self.model,
                "tokens_predicted": predicted, "tokens_evaluated": self.prompt_tokens,
                "generation_settings": self.settings, "has_new_line": "\n" in content, "truncated": False,
                "stop_type": stop_type, "stopping_word": "", "tokens_cached": 0, **extra}

    def response(self, text: str, last: "Chunk") -> dict:
        """The non-streamed response; `last` is the generation's final chunk."""
        return self._final(text, _STOP_TYPE[last.finish_reason], last.stats.new_tokens,
                           {"timings": timings(last.stats), "specdraft": specdraft_stats(last.stats, self.tenant)})

    def warmup(self) -> dict:
        """The answer to n_predict 0: nothing generated."""
        return self._final("", "limit", 0, {})

    def opening(self) -> list[dict]:
        return []

    def chunks(self, chunk: "Chunk") -> list[dict]:
        """Stream events for one generation chunk; the last one has "stop": true."""
        if chunk.finish_reason is None:
            return [{"index": 0, "content": chunk.text, "tokens": list(chunk.token_ids), "stop": False,
                     "id_slot": 0, "tokens_evaluated": self.prompt_tokens}] if chunk.text else []
        return [self.response(chunk.text, chunk)]

    def error(self, error: ApiError) -> dict:
        return error_body(error)
