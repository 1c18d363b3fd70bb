"""Domain errors of specdraft, raised by the cores and the shells alike.

Every shell answers them through one table (`retriever.status`: gRPC code, HTTP status,
OpenAI error type). Messages follow "X must be Y, got Z".
"""


class SpecdraftError(Exception):
    """Base class of every error raised on purpose."""


class InvalidArgument(SpecdraftError):
    """The request itself is malformed (bad ids, sizes, budgets)."""


class NotFound(SpecdraftError):
    """The request names a session the server does not hold."""


class FailedPrecondition(SpecdraftError):
    """The system is not in a state to serve this (e.g. tokenizer mismatch)."""


class NotOwner(FailedPrecondition):
    """The tenant is owned by other replicas (placement); the message ends "(owners: host:port,...)"."""

    def __init__(self, message: str, owners: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.owners = owners  # advertised addresses, best first


class ResourceExhausted(SpecdraftError):
    """A server capacity limit was hit; retrying later may succeed."""


class Overloaded(ResourceExhausted):
    """Too many calls in flight and queued, or a request that waited too long (retry after a backoff)."""


class Unavailable(SpecdraftError):
    """The server is not ready yet (indexes still loading), shutting down, or unreachable."""


class DeadlineExceeded(Unavailable):
    """The call's deadline passed before it was answered."""


class IndexFormatError(SpecdraftError):
    """An index directory is missing, corrupt, or of an unknown format version."""


class Unauthenticated(SpecdraftError):
    """The call carries no valid credential (auth on, see retriever.credentials)."""


class PermissionDenied(SpecdraftError):
    """The credential is valid but does not cover what the call asks for (another tenant, admin details)."""
