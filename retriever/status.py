"""The one table from domain errors to statuses: gRPC code, HTTP status, OpenAI error type.

Every shell uses it: the retriever's servicer and auth guard, the retriever client (status ->
error, `error_of`), the verifier's gRPC servicer and its OpenAI-compatible HTTP API. A class
not in the table takes its nearest base's row; anything else is INTERNAL / 500.

| error | gRPC | HTTP | OpenAI type |
|---|---|---|---|
| InvalidArgument | INVALID_ARGUMENT | 400 | invalid_request_error |
| NotFound | NOT_FOUND | 404 | invalid_request_error |
| FailedPrecondition, IndexFormatError, NotOwner | FAILED_PRECONDITION | 400 | invalid_request_error |
| ResourceExhausted, Overloaded | RESOURCE_EXHAUSTED | 429 | rate_limit_error |
| Unavailable | UNAVAILABLE | 503 | server_error |
| DeadlineExceeded | DEADLINE_EXCEEDED | 504 | server_error |
| Unauthenticated | UNAUTHENTICATED | 401 | invalid_request_error |
| PermissionDenied | PERMISSION_DENIED | 403 | invalid_request_error |
| (anything else) | INTERNAL | 500 | server_error |

(HTTP statuses follow the gRPC <-> HTTP mapping of google.rpc.Code; OpenAI answers 401 and 403
with type invalid_request_error too.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from retriever import errors


@dataclass(frozen=True)
class Status:
    """How one kind of failure is answered on each wire."""

    grpc: grpc.StatusCode
    http: int
    openai_type: str


INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "server_error")
TABLE: dict[type[errors.SpecdraftError], Status] = {
    errors.InvalidArgument: Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    errors.NotFound: Status(grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    errors.FailedPrecondition: Status(grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
    errors.IndexFormatError: Status(grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
    errors.NotOwner: Status(grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
    errors.ResourceExhausted: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    errors.Unavailable: Status(grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    errors.DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
    errors.Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error"),
    errors.PermissionDenied: Status(grpc.StatusCode.PERMISSION_DENIED, 403, "invalid_request_error"),
}
# status code -> the domain error a client raises for it (the first row naming the code)
_ERROR_BY_CODE: dict[grpc.StatusCode, type[errors.SpecdraftError]] = {}
for _cls, _status in TABLE.items():
    _ERROR_BY_CODE.setdefault(_status.grpc, _cls)
_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def status_of(error: BaseException) -> Status:
    """The row of the error's class or nearest base; INTERNAL for anything else."""
    for cls in type(error).__mro__:
        status = TABLE.get(cls)  # type: ignore[call-overload]
        if status is not None:
            return status
    return INTERNAL


def code_of(error: BaseException) -> grpc.StatusCode:
    return status_of(error).grpc


def error_of(code: grpc.StatusCode | int, message: str) -> errors.SpecdraftError:
    """The domain error of a status (a `grpc.StatusCode` or its number) with "CODE: message";
    codes outside the table give a plain SpecdraftError; FAILED_PRECONDITION naming owners a NotOwner."""
    if isinstance(code, int):
        code = _CODE_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    owners = owners_in(message)
    if owners and code == TABLE[errors.NotOwner].grpc:
        return errors.NotOwner(f"{code.name}: {message}", owners)
    return _ERROR_BY_CODE.get(code, errors.SpecdraftError)(f"{code.name}: {message}")


OWNERS_MARK = "(owners: "  # NotOwner's message ends with this, the addresses, and ")"
# A durable EndSession that ended the session but could not confirm its output in the log answers
# UNAVAILABLE with this message: the end was taken, so a client must not end the session elsewhere.
NOT_DURABLE_MARK = "EndSession's output must be durable"


def owners_in(message: str) -> tuple[str, ...]:
    """The owner addresses a NotOwner message names (its "(owners: a,b)" tail); () when none.
    Example: owners_in("... (owners: h1:1,h2:2)") == ("h1:1", "h2:2")."""
    head, mark, tail = message.rpartition(OWNERS_MARK)
    if not mark or not tail.endswith(")"):
        return ()
    return tuple(a for a in tail[:-1].split(",") if a)


def answer(error: BaseException, log: logging.Logger, server: str) -> tuple[Status, str]:
    """The row and the message to answer `error` with; an error outside the table is logged to
    `log` with its traceback and answered "internal error (Type), see the <server>'s log"."""
    status = status_of(error)
    if status is INTERNAL:
        log.error("%s call failed with an unexpected %s", server, type(error).__name__, exc_info=error)
        return status, f"internal error ({type(error).__name__}), see the {server}'s log"
    return status, str(error)
