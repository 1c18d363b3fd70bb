"""Domain errors of the retriever core.

The core raises these; the gRPC layer maps them to status codes in one place
(`retriever.service.STATUS_BY_ERROR`). Messages follow "X must be Y, got Z".
"""


class SpecdraftError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidArgument(SpecdraftError):
    """The request itself is malformed (bad ids, sizes, budgets)."""


class NotFound(SpecdraftError):
    """The request names a session the server does not hold."""


class FailedPrecondition(SpecdraftError):
    """The system is not in a state to serve this (e.g. tokenizer mismatch)."""


class ResourceExhausted(SpecdraftError):
    """A server capacity limit was hit; retrying later may succeed."""


class Unavailable(SpecdraftError):
    """The server is not ready yet (indexes still loading) or shutting down."""


class IndexFormatError(SpecdraftError):
    """An index directory is missing, corrupt, or of an unknown format version."""


class Unauthenticated(SpecdraftError):
    """The call carries no valid credential (auth on, see retriever.auth_tokens)."""


class PermissionDenied(SpecdraftError):
    """The credential is valid but does not cover what the call asks for (another tenant, admin details)."""
