"""Client-side security of a channel to the retriever: TLS, mTLS and a bearer token.

`ChannelSecurity(root_ca=..., client_cert=..., client_key=..., token=..., tls=...)` (PEM file
paths) and `open_channel(target, security, options)`: a secure channel when `tls` or any
certificate is set (root_ca None: the system roots), else plaintext; with `token` every call
carries `authorization: Bearer <token>` metadata (over plaintext too, e.g. on loopback).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import grpc


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a retriever that has TLS/mTLS and/or auth on; the default: plaintext, no token."""

    root_ca: str | None = None  # PEM CA the server's certificate must chain to (None: system roots)
    client_cert: str | None = None  # PEM client certificate chain (mTLS), with client_key
    client_key: str | None = None
    token: str | None = field(default=None, repr=False)  # bearer token (never shown)
    tls: bool = False  # TLS with the system roots even without root_ca

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(f"client_cert and client_key must be given together, got only "
                             f"{'client_cert' if self.client_cert is not None else 'client_key'}")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("token must be non-empty without whitespace, got a value not shown")

    @property
    def secure(self) -> bool:
        return self.tls or self.root_ca is not None or self.client_cert is not None


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    pass


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _Details:
        metadata = [*(d.metadata or ()), self._header]
        return _Details(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                        getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} must be a readable PEM file, got {path} ({e.strerror})") from None


def open_channel(target: str, security: ChannelSecurity | None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `target` as `security` says (None: plaintext, no token); ValueError for unreadable files."""
    security = security or ChannelSecurity()
    if security.secure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(security.root_ca, "root_ca"),
            private_key=_read(security.client_key, "client_key"),
            certificate_chain=_read(security.client_cert, "client_cert"))
        channel = grpc.secure_channel(target, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    if security.token is not None:
        channel = grpc.intercept_channel(channel, _Bearer(security.token))
    return channel
