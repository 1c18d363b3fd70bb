"""Authentication and transport security of the retriever's gRPC server.

- `guard(servicer, tokens)`: with a `TokenTable` (auth on), a `specdraft.v1.Retriever`
  servicer in front of the real one. Every call needs `authorization: Bearer <token>`
  metadata naming a known token (else UNAUTHENTICATED); every tenant a call names (Draft,
  each DraftStream request, each DraftBatch item, EndSession) must be one of the token's
  (else PERMISSION_DENIED, before any of the call's work; a DraftStream answers the requests
  before the foreign one, then ends). Describe needs any valid token; its admin details
  (the indexes' filesystem paths) are only filled in for admin tokens. Denials are logged
  with the token's label, never the token, and counted in `specdraft_retriever_auth_denials`
  {rpc, code}; the log is rate-limited (one summary line per RPC and code every 10 s,
  with a count). Without tokens (the default) nothing is checked.
- `server_credentials(settings)`: TLS (`tls_cert` + `tls_key`) and mTLS (`tls_client_ca`:
  client certificates signed by it are required) credentials, or None (plaintext).
- `load_security(settings)`: both (the tokens None when auth is off); OSError when a file is bad.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Sequence

import grpc

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever import errors
from retriever.credentials import Principal, TokenTable, load_tokens, read_pem
from retriever.logs import SummaryLog
from retriever.service.metrics import RetrieverMetrics
from retriever.service.settings import RetrieverSettings, env_name
from retriever.status import code_of

log = logging.getLogger(__name__)
DENIAL_LOG_INTERVAL_S = 10.0


async def _deny(context: grpc.aio.ServicerContext, rpc: str, error: errors.SpecdraftError,
                metrics: RetrieverMetrics | None, denials: SummaryLog) -> None:
    """Logs (rate-limited: a summary line per RPC and code per interval, with the last peer and
    message, never a token) and counts the denial, and aborts the call with its status."""
    code = code_of(error)
    denials.note(f"{rpc}/{code.name}", "retriever %s denied (%s) for %s: %s", rpc, code.name, context.peer(), error)
    if metrics is not None:
        metrics.auth_denied(rpc, code.name)
    await context.abort(code, str(error))
    raise AssertionError("unreachable: abort raises")


def check_tenants(principal: Principal, named: Sequence[tuple[str, str]]) -> None:
    """Raises PermissionDenied at the first (field, tenant) of `named` whose tenant is not the token's."""
    for field, tenant in named:
        if not principal.allows(tenant):
            shown = repr(tenant) if len(tenant) <= 128 else f"{tenant[:128] + '...'!r} ({len(tenant)} characters)"
            raise errors.PermissionDenied(
                f"{field} must be a tenant of the caller's token ({principal.label}), got {shown}")


class GuardedServicer(pb_grpc.RetrieverServicer):
    """Checks the bearer token and tenants, then delegates to `inner` (see the module docstring)."""

    def __init__(self, inner: pb_grpc.RetrieverServicer, tokens: TokenTable,
                 metrics: RetrieverMetrics | None = None) -> None:
        self._inner, self._tokens, self._metrics = inner, tokens, metrics
        self._denials = SummaryLog(log, DENIAL_LOG_INTERVAL_S)  # one line per (rpc, code) per interval

    async def _principal(self, context: grpc.aio.ServicerContext, rpc: str) -> Principal:
        try:
            return self._tokens.authenticate(context.invocation_metadata())
        except errors.Unauthenticated as e:
            await _deny(context, rpc, e, self._metrics, self._denials)
            raise

    async def _admit(self, context: grpc.aio.ServicerContext, rpc: str,
                     named: Sequence[tuple[str, str]]) -> Principal:
        principal = await self._principal(context, rpc)
        try:
            check_tenants(principal, named)
        except errors.PermissionDenied as e:
            await _deny(context, rpc, e, self._metrics, self._denials)
        return principal

    async def Draft(self, request: pb.DraftRequest, context: grpc.aio.ServicerContext) -> pb.DraftResponse:
        await self._admit(context, "Draft", [("tenant", request.tenant)])
        return await self._inner.Draft(request, context)

    async def DraftBatch(self, request: pb.DraftBatchRequest,
                         context: grpc.aio.ServicerContext) -> pb.DraftBatchResponse:
        await self._admit(context, "DraftBatch",
                          [(f"requests[{i}].tenant", r.tenant) for i, r in enumerate(request.requests)])
        return await self._inner.DraftBatch(request, context)

    async def EndSession(self, request: pb.EndSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.EndSessionResponse:
        await self._admit(context, "EndSession", [("tenant", request.tenant)])
        return await self._inner.EndSession(request, context)

    async def DraftStream(self, request_iterator: AsyncIterator[pb.DraftRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DraftResponse]:
        principal = await self._principal(context, "DraftStream")
        denied: list[errors.PermissionDenied] = []

        async def checked() -> AsyncIterator[pb.DraftRequest]:
            async for request in request_iterator:
                try:
                    check_tenants(principal, [("tenant", request.tenant)])
                except errors.PermissionDenied as e:
                    denied.append(e)
                    return
                yield request

        async for response in self._inner.DraftStream(checked(), context):
            yield response
        if denied:
            await _deny(context, "DraftStream", denied[0], self._metrics, self._denials)

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        principal = await self._principal(context, "Describe")
        response = await self._inner.Describe(request, context)
        if not principal.admin:  # filesystem paths are admin details
            for index in response.indexes:
                index.ClearField("path")
        return response


def guard(servicer: pb_grpc.RetrieverServicer, tokens: TokenTable | None,
          metrics: RetrieverMetrics | None = None) -> pb_grpc.RetrieverServicer:
    """`servicer` behind the token checks; as is when `tokens` is None (auth off). Denials are
    counted in `metrics`, by default the servicer's own (`servicer.metrics`, if it has one)."""
    if tokens is None:
        return servicer
    return GuardedServicer(servicer, tokens, metrics if metrics is not None else getattr(servicer, "metrics", None))


def _read(path: str, field: str) -> bytes:
    return read_pem(path, env_name(field))


def server_credentials(settings: RetrieverSettings) -> grpc.ServerCredentials | None:
    """TLS / mTLS credentials from the settings' PEM files; None without `tls_cert` (ValueError when unreadable)."""
    if not settings.tls_cert:
        return None
    pair = (_read(settings.tls_key, "tls_key"), _read(settings.tls_cert, "tls_cert"))
    client_ca = _read(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def load_security(settings: RetrieverSettings) -> tuple[TokenTable | None, grpc.ServerCredentials | None]:
    """The tokens (None: auth off) and TLS credentials (None: plaintext); OSError when a file is bad."""
    try:
        tokens = load_tokens(settings.auth_tokens_file) if settings.auth_tokens_file else None
        return tokens, server_credentials(settings)
    except ValueError as e:
        raise OSError(str(e)) from None
