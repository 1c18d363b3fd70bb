"""The one table from domain errors to gRPC codes, HTTP statuses and OpenAI types, both ways."""

import logging

import grpc
import pytest

from retriever import errors
from retriever.status import INTERNAL, TABLE, answer, code_of, error_of, status_of

ROWS = [  # (error, gRPC code, HTTP status)
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, 404),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (errors.IndexFormatError, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (errors.NotOwner, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403),
]


@pytest.mark.parametrize("cls, code, http", ROWS)
def test_every_domain_error_has_its_row(cls, code, http):
    status = status_of(cls("x must be y, got z"))
    assert (status.grpc, status.http, code_of(cls("m"))) == (code, http, code)


def test_every_error_class_is_covered_and_a_subclass_takes_its_base_row():
    declared = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SpecdraftError)}
    assert declared - {errors.SpecdraftError} == {cls for cls, _, _ in ROWS}
    assert set(TABLE) <= declared

    class Narrower(errors.NotFound):
        pass
    assert status_of(Narrower("m")).grpc == grpc.StatusCode.NOT_FOUND
    assert status_of(ValueError("m")) is INTERNAL and status_of(errors.SpecdraftError("m")) is INTERNAL


@pytest.mark.parametrize("cls, code, http", ROWS)
def test_a_client_gets_the_error_back_from_the_code(cls, code, http):
    error = error_of(code, "the message")
    # subclasses come back as their base (NotOwner only when the message names its owners)
    assert isinstance(error, cls if cls not in (errors.IndexFormatError, errors.Overloaded, errors.NotOwner)
                      else cls.__mro__[1])
    assert str(error) == f"{code.name}: the message"
    assert type(error_of(code.value[0], "m")) is type(error)  # the status number alone
    assert type(error_of(grpc.StatusCode.INTERNAL, "m")) is errors.SpecdraftError
    assert type(error_of(9999, "m")) is errors.SpecdraftError


def test_answer_logs_only_unexpected_errors(caplog):
    log = logging.getLogger("tests.status")
    with caplog.at_level(logging.ERROR, "tests.status"):
        status, message = answer(errors.NotFound("session must exist, got 's'"), log, "retriever")
        assert (status.grpc, message, caplog.records) == (grpc.StatusCode.NOT_FOUND, "session must exist, got 's'", [])
        status, message = answer(KeyError("secret detail"), log, "verifier")
    assert status is INTERNAL and message == "internal error (KeyError), see the verifier's log"
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
