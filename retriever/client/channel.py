"""Client-side security of a channel to the retriever: TLS, mTLS, a bearer token, refusals.

- `ChannelSecurity(root_ca=..., client_cert=..., client_key=..., token=..., tls=..., server_name=...)`
  (PEM file paths) and `open_channel(target, security, options)`: a secure channel when `tls`,
  `server_name` or any certificate is set (root_ca None: the system roots), else plaintext; with
  `token` every call carries `authorization: Bearer <token>` metadata (over plaintext too, e.g.
  on loopback). `server_name` overrides the name the server's certificate must carry.
- `Refusals`: the retriever's UNAUTHENTICATED / PERMISSION_DENIED answers, shared by a client's
  sessions: drafting holds off for `hold_s` (every tenant after UNAUTHENTICATED, the tenant after
  PERMISSION_DENIED), and each refusal is logged once (WARNING, never the token) until accepted again.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc

from retriever.credentials import read_pem

log = logging.getLogger(__name__)
REFUSAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
_MAX_REFUSED_TENANTS = 1024  # tenants remembered as refused (the oldest is forgotten beyond)


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a retriever that has TLS/mTLS and/or auth on; the default: plaintext, no token."""

    root_ca: str | None = None  # PEM CA the server's certificate must chain to (None: system roots)
    client_cert: str | None = None  # PEM client certificate chain (mTLS), with client_key
    client_key: str | None = None
    token: str | None = field(default=None, repr=False)  # bearer token (never shown)
    tls: bool = False  # TLS with the system roots even without root_ca
    server_name: str | None = None  # the name the server's certificate must hold (default: target's host); TLS

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(f"client_cert and client_key must be given together, got only "
                             f"{'client_cert' if self.client_cert is not None else 'client_key'}")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("token must be non-empty without whitespace, got a value not shown")

    @property
    def secure(self) -> bool:
        return self.tls or self.root_ca is not None or self.client_cert is not None or bool(self.server_name)


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
    return None if path is None else read_pem(path, what)


def open_channel(target: str, security: ChannelSecurity | None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `target` as `security` says (None: plaintext, no token); ValueError for unreadable files."""
    security = security or ChannelSecurity()
    options = list(options)
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    if security.secure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(security.root_ca, "root_ca"),
            private_key=_read(security.client_key, "client_key"),
            certificate_chain=_read(security.client_cert, "client_cert"))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if security.token is not None:
        channel = grpc.intercept_channel(channel, _Bearer(security.token))
    return channel




@dataclass
class _Refusal:
    until: float  # monotonic time until which drafting holds off
    code: str
    logged: bool = False


class Refusals:
    """The retriever's refusals of a client's credential (see the module docstring). Thread-safe."""

    def __init__(self, target: str, hold_s: float = 30.0) -> None:
        if hold_s <= 0:
            raise ValueError(f"hold_s must be > 0, got {hold_s}")
        self.target, self.hold_s = target, hold_s
        self._by_key: collections.OrderedDict[str | None, _Refusal] = collections.OrderedDict()  # None: all tenants
        self._lock = threading.Lock()

    def held(self, tenant: str) -> bool:
        """True while drafting for `tenant` holds off after a refusal."""
        if not self._by_key:
            return False
        now = time.monotonic()
        with self._lock:
            return any(r is not None and now < r.until for r in (self._by_key.get(None), self._by_key.get(tenant)))

    def refused(self, tenant: str, code: grpc.StatusCode, message: str) -> None:
        """Records a refusal of the call for `tenant`; logs it unless it is already logged."""
        key = None if code == grpc.StatusCode.UNAUTHENTICATED else tenant
        with self._lock:
            refusal = self._by_key.pop(key, None) or _Refusal(0.0, code.name)
            refusal.until, refusal.code = time.monotonic() + self.hold_s, code.name
            self._by_key[key] = refusal
            while len(self._by_key) > _MAX_REFUSED_TENANTS:
                self._by_key.popitem(last=False)
            first, refusal.logged = not refusal.logged, True
        scope = "every tenant" if key is None else f"tenant {_shown(tenant)}"
        if first:
            log.warning("retriever at %s refused the verifier's credential for %s (%s: %s); generations continue "
                        "with plain decoding, drafting retried every %.0f s (logged once until accepted)",
                        self.target, scope, code.name, message[:300], self.hold_s)
        else:
            log.debug("retriever at %s still refuses %s (%s)", self.target, scope, code.name)

    def accepted(self, tenant: str) -> None:
        """A call for `tenant` succeeded: its refusals (and a refusal of every tenant) are over."""
        if not self._by_key:
            return
        with self._lock:
            gone = [k for k in (None, tenant) if self._by_key.pop(k, None) is not None]
        if gone:
            log.info("retriever at %s accepts the verifier's credential again (%s)", self.target,
                     "every tenant" if None in gone else f"tenant {_shown(tenant)}")


def _shown(tenant: str) -> str:
    return repr(tenant if len(tenant) <= 64 else tenant[:64] + "...")
