"""Who may call the verifier's own APIs (the OpenAI-compatible HTTP API and gRPC Generate).

- `api_auth(settings) -> ApiAuth`: with `auth_tokens_file` (SPECDRAFT_VERIFIER_AUTH_TOKENS_FILE,
  the retriever's tokens-file format, `retriever.credentials`) every HTTP route but /health, and
  gRPC Generate, need `Authorization: Bearer <token>` (UNAUTHENTICATED / 401); the HTTP API's
  /metrics needs an `admin` token (403). With only the legacy `api_key`, the HTTP API needs that
  key (every tenant, /metrics open) and gRPC is open. With neither, nothing is checked.
- `tenant_for(principal, requested, default, field)`: the tenant a generation drafts for. A
  request naming a tenant outside its token's gets PERMISSION_DENIED / 403; a request naming
  none gets the token's only tenant (or the default tenant when the token covers it).
- `server_tls(settings) -> ServerTls | None`: the PEM files of `tls_cert` / `tls_key` /
  `tls_client_ca` read and checked (ValueError naming the setting); `grpc_credentials()` for the
  gRPC server, the paths for uvicorn.
- `grpc_principal(auth, metadata)`: the caller of a gRPC call (None: not checked); raises
  `retriever.errors`' Unauthenticated. `authorize_http` / `http_tenant`: the same for an HTTP
  request, raising OpenAI-shaped `ApiError`s (401 `invalid_api_key`, 403 `permission_denied`,
  400 `tenant_required`). Messages never hold any part of a token; denials are logged with the
  token's label, rate-limited (one summary line per API, route and kind every 10 s, with a count).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import grpc

from retriever import errors
from retriever.credentials import Principal, TokenGrant, TokenTable, load_tokens, read_pem, token_digest
from retriever.logs import SummaryLog
from verifier.api.json_fields import ApiError
from verifier.api.settings import VerifierSettings, env_name

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger(__name__)
DENIAL_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ApiAuth:
    """The verifier's credentials: `tokens` (None: no checks), whether gRPC Generate checks them,
    whether /metrics of the HTTP API needs an admin token; `denials`, the server's rate-limited
    log of refused calls."""

    tokens: TokenTable | None = None
    grpc: bool = False
    admin_metrics: bool = False
    denials: SummaryLog = field(default_factory=lambda: SummaryLog(log, DENIAL_LOG_INTERVAL_S),
                                compare=False, repr=False)

    @property
    def on(self) -> bool:
        return self.tokens is not None


def api_auth(settings: VerifierSettings) -> ApiAuth:
    """The settings' credentials; ValueError (naming the setting) for a bad tokens file."""
    if settings.auth_tokens_file:
        try:
            tokens = load_tokens(settings.auth_tokens_file, owner="verifier")
        except ValueError as e:
            raise ValueError(f"{env_name('auth_tokens_file')}: {e}") from None
        return ApiAuth(tokens, grpc=True, admin_metrics=True)
    if settings.api_key:
        grant = TokenGrant(token_digest(settings.api_key), Principal(None, False, "api key"))
        return ApiAuth(TokenTable((grant,), owner="verifier"))
    return ApiAuth()


@dataclass(frozen=True)
class ServerTls:
    """The verifier's TLS files (paths) and their PEM contents."""

    cert: str
    key: str
    client_ca: str  # "": no client certificates asked for
    pem: tuple[bytes, bytes, bytes | None]  # cert, key, client CA

    def grpc_credentials(self) -> grpc.ServerCredentials:
        cert, key, client_ca = self.pem
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def uvicorn_options(self) -> dict:
        """uvicorn.Config's TLS options (HTTPS; client certificates required with a client CA)."""
        return dict(ssl_certfile=self.cert, ssl_keyfile=self.key, ssl_ca_certs=self.client_ca or None,
                    ssl_cert_reqs=ssl.CERT_REQUIRED if self.client_ca else ssl.CERT_NONE)


def _pem(path: str, field: str) -> bytes:
    return read_pem(path, env_name(field))


def server_tls(settings: VerifierSettings) -> ServerTls | None:
    """The settings' TLS files, read and loaded once as a check; None without `tls_cert` (plaintext)."""
    if not settings.tls_cert:
        return None
    client_ca = _pem(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    pem = (_pem(settings.tls_cert, "tls_cert"), _pem(settings.tls_key, "tls_key"), client_ca)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"{env_name('tls_cert')} and {env_name('tls_key')} must be a PEM certificate chain and its "
                         f"key, got {settings.tls_cert} and {settings.tls_key} ({e})") from None
    return ServerTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca, pem)


def grpc_principal(auth: ApiAuth, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
    """The caller of a gRPC call (None when gRPC auth is off); raises Unauthenticated."""
    if not auth.grpc or auth.tokens is None:
        return None
    return auth.tokens.authenticate(metadata)


def require_admin(principal: Principal | None, what: str) -> None:
    """Raises PermissionDenied unless `principal` is an admin (None: auth off, allowed)."""
    if principal is not None and not principal.admin:
        raise errors.PermissionDenied(f"{what} must be called with an admin token, got {principal.label}'s")


def tenant_for(principal: Principal | None, requested: str, default: str, field: str) -> str:
    """The tenant to draft for ("" leaves the default to the request checks); raises
    PermissionDenied (a tenant outside the token's, a token without tenants) or InvalidArgument
    (a token of several tenants, the default not among them, and none named)."""
    if principal is None or principal.tenants is None:
        return requested
    if requested:
        if principal.allows(requested):
            return requested
        cut = requested[:128] + "..."
        shown = repr(requested) if len(requested) <= 128 else f"{cut!r} ({len(requested)} characters)"
        raise errors.PermissionDenied(
            f"{field} must be a tenant of the caller's token ({principal.label}), got {shown}")
    if not principal.tenants:
        raise errors.PermissionDenied(f"the caller's token ({principal.label}) must grant a tenant to generate, "
                                      f"got an admin-only token")
    if len(principal.tenants) == 1:
        return next(iter(principal.tenants))
    if default in principal.tenants:
        return default
    raise errors.InvalidArgument(f"{field} must name one of the caller's token's {len(principal.tenants)} tenants "
                                 f"({principal.label}), got none")


def denied(auth: ApiAuth, api: str, what: str, peer: str, error: errors.SpecdraftError) -> None:
    """Logs a refused call, rate-limited (a summary line per API, what and kind per interval with a
    count): the API, what was called, the last peer and message (never a token)."""
    kind = "UNAUTHENTICATED" if isinstance(error, errors.Unauthenticated) else "PERMISSION_DENIED"
    auth.denials.note(f"{api} {what} {kind}", "verifier %s %s denied (%s) for %s: %s", api, what, kind, peer, error)


def _peer(request: "Request") -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def authorize_http(auth: ApiAuth, request: "Request", admin: bool = False) -> Principal | None:
    """The caller of an HTTP request (None: auth off); ApiError 401 without a valid token, 403
    when `admin` is asked for and the token is not one."""
    try:
        principal = (auth.tokens.authenticate_values(request.headers.getlist("authorization"),
                                                     "header 'Authorization'") if auth.tokens is not None else None)
        if admin:
            require_admin(principal, f"{request.method} {request.url.path}")
        return principal
    except errors.SpecdraftError as e:
        denied(auth, "http", request.url.path, _peer(request), e)
        code = "invalid_api_key" if isinstance(e, errors.Unauthenticated) else "permission_denied"
        raise ApiError.of(e, code=code) from None


def http_tenant(auth: ApiAuth, principal: Principal | None, request: "Request", requested: str,
                default: str, body_field: str | None = "user") -> str:
    """`tenant_for` of an HTTP request (named by the X-Specdraft-Tenant header or the body's
    `body_field`; None: the route's body names none); errors as ApiError."""
    header = request.headers.get("x-specdraft-tenant") or body_field is None
    field = "the X-Specdraft-Tenant header" if header else body_field
    try:
        return tenant_for(principal, requested, default, field)
    except errors.PermissionDenied as e:
        denied(auth, "http", request.url.path, _peer(request), e)
        raise ApiError.of(e, code="permission_denied") from None
    except errors.InvalidArgument as e:
        raise ApiError.of(e, param=body_field, code="tenant_required") from None
