"""Typed readers of a JSON request body's fields, shared by the OpenAI (`verifier.api.openai_wire`)
and llama.cpp (`verifier.api.infill`) wire formats.

Pure (no HTTP framework, no model). Each reader returns the field's value (or its default when
the field is absent or null) and raises `ApiError` 400 naming the field, "X must be Y, got Z"
(`show` renders Z), on any other shape. A string holding a lone surrogate (JSON's `"\\ud800"`) is a
400 naming its field: no tokenizer or response can take it.
"""

from __future__ import annotations

from typing import Mapping

from retriever import errors
from retriever.status import status_of
from verifier.api.requests import MAX_ID_BYTES


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


def show(value: object) -> str:
    """A short rendering of a client's value for "got Z" (strings cut at 40 characters)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else repr(value).lower() if isinstance(value, bool) else repr(value)


def bad(param: str, what: str, value: object) -> ApiError:
    """The 400 "param must be what, got value"."""
    return ApiError(400, f"{param} must be {what}, got {show(value)}", param=param)


def unicode_text(param: str, v: str) -> str:
    """`v` when UTF-8 can encode it; ApiError 400 naming `param` at its first lone surrogate."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param} must be valid Unicode text, got a lone surrogate at character {e.start}",
                       param=param) from None
    return v


def number(body: Mapping, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(key, "a number", v)
    return float(v)


def integer(body: Mapping, key: str, default: int | None, lo: int = -(1 << 63), hi: int = 1 << 64) -> int | None:
    """An integer in [lo, hi) (a float with an integer value counts)."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise bad(key, f"an integer in [{lo}, {hi})" if lo > -(1 << 63) else "an integer", v)
    return v


def boolean(body: Mapping, key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise bad(key, "a boolean", v)
    return bool(v)


def string(body: Mapping, key: str) -> str:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise bad(key, "a string", v)
    return unicode_text(key, v or "")


def stops(body: Mapping) -> tuple[str, ...]:
    """`stop`: a string or a list of strings."""
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (unicode_text("stop", v),)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(unicode_text(f"stop[{i}]", s) for i, s in enumerate(v))
    raise bad("stop", "a string or a list of strings", v)


def json_object(body: object) -> Mapping:
    """The request body when it is a JSON object."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {show(body)}")
    return body


def tenant_header(value: str) -> str:
    """The X-Specdraft-Tenant header's value when it fits MAX_ID_BYTES."""
    if len(value.encode()) > MAX_ID_BYTES:
        raise ApiError(400, f"the X-Specdraft-Tenant header must be at most {MAX_ID_BYTES} bytes, got "
                       f"{len(value.encode())} bytes")
    return value
