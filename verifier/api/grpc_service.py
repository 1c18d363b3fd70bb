"""The `specdraft.v1.Verifier` gRPC service: proto -> `validate` -> `Generator.stream` -> proto.

- `validate(request, model, settings) -> GenerationRequest`: the proto as `RequestValues`, checked
  by `verifier.api.requests.check` (the rules shared with the HTTP API); raises `InvalidArgument`
  (bad fields, prompt too long for the model) or `FailedPrecondition` (chat without a template).
- `VerifierServicer`: the gRPC shell over a `Generator` (`verifier.api.generation`); domain errors
  become status codes through the one table (`retriever.status`), before any message is
  streamed. With auth (`verifier.api.auth.ApiAuth`), a call needs `authorization: Bearer <token>`
  metadata (UNAUTHENTICATED) and drafts for its token's tenant (another one: PERMISSION_DENIED);
  refusals are counted in `rejections`. A call beyond the generator's queue is refused with
  RESOURCE_EXHAUSTED (trailing metadata `retry-after`: seconds); a generation ends within one step
  of its call ending (the client left, or the call's deadline passed) and at
  `settings.request_deadline_s` (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Iterator

import grpc

from protos.specdraft.v1 import verifier_pb2 as pb
from protos.specdraft.v1 import verifier_pb2_grpc as pb_grpc
from retriever import errors
from retriever.status import answer
from verifier.api.auth import ApiAuth, denied, grpc_principal, tenant_for
from verifier.api.generation import Chunk, Generator, QueueFull
from verifier.api.metrics import reason_label
from verifier.api.requests import GRPC_NAMES, ChatMessage, GenerationRequest, RequestValues, check
from verifier.api.settings import VerifierSettings

if TYPE_CHECKING:
    from verifier.decoding.backend import Backend

log = logging.getLogger(__name__)
_FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}


def values_of(request: pb.GenerateRequest) -> RequestValues:
    """The proto as plain values (no checks)."""
    kind = request.WhichOneof("prompt")
    s = request.sampling
    return RequestValues(
        text=request.text if kind == "text" else None,
        token_ids=tuple(request.token_ids.ids) if kind == "token_ids" else None,
        messages=tuple(ChatMessage(m.role, m.content) for m in request.chat.messages) if kind == "chat" else None,
        temperature=float(s.temperature), top_p=float(s.top_p) if s.HasField("top_p") else 1.0, top_k=int(s.top_k),
        seed=s.seed if s.HasField("seed") else None, typical=bool(s.typical_acceptance),
        max_new_tokens=int(s.max_new_tokens), stops=tuple(s.stop), tenant=request.tenant,
        request_id=request.request_id, no_draft=bool(request.no_draft), prediction=request.prediction,
        suffix=request.suffix)


def validate(request: pb.GenerateRequest, model: "Backend", settings: VerifierSettings) -> GenerationRequest:
    """The checked, tokenized request; raises InvalidArgument / FailedPrecondition."""
    return check(values_of(request), model, settings, GRPC_NAMES)


def encode_chunk(chunk: Chunk) -> pb.GenerateResponse:
    response = pb.GenerateResponse(text=chunk.text, token_ids=list(chunk.token_ids))
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.stats is not None:
        s = chunk.stats
        response.stats.CopyFrom(pb.GenerateStats(
            prompt_tokens=s.prompt_tokens, new_tokens=s.new_tokens, steps=s.steps,
            mean_accepted_tokens=s.mean_accepted_tokens, draft_s=s.draft_s, verify_s=s.verify_s,
            tokens_per_s=s.tokens_per_s, draft_nodes=s.draft_nodes, accepted_draft_tokens=s.accepted_draft_tokens,
            wall_s=s.wall_s, accepted_by_source=[pb.SourceTokens(source=k, tokens=v)
                                                 for k, v in s.accepted_by_source.items()]))
        if chunk.prediction is not None:
            response.stats.accepted_prediction_tokens, response.stats.rejected_prediction_tokens = chunk.prediction
    return response


def _gone(context: grpc.ServicerContext):
    """stop() of a call's generation: true once the client left or the call's deadline passed."""
    return lambda: not context.is_active()


class VerifierServicer(pb_grpc.VerifierServicer):
    """Generate: validate, then stream the generator's chunks."""

    def __init__(self, settings: VerifierSettings, generator: Generator, auth: ApiAuth | None = None) -> None:
        self._settings, self._generator, self._auth = settings, generator, auth or ApiAuth()

    def _checked(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> GenerationRequest:
        """The caller's checked request, its tenant the token's (raises the domain errors)."""
        values = values_of(request)
        try:
            principal = grpc_principal(self._auth, context.invocation_metadata())
            tenant = tenant_for(principal, values.tenant, self._settings.default_tenant, "tenant")
        except (errors.Unauthenticated, errors.PermissionDenied) as e:
            denied(self._auth, "grpc", "Generate", context.peer(), e)
            raise
        return check(dataclasses.replace(values, tenant=tenant), self._generator.model, self._settings, GRPC_NAMES)

    def _deadline(self, context: grpc.ServicerContext) -> float | None:
        """The earlier of the call's deadline and the settings' (time.monotonic(); None: neither)."""
        ends = [time.monotonic() + left for left in (context.time_remaining(), self._settings.request_deadline_s)
                if left is not None and left > 0]
        return min(ends) if ends else None

    def _refuse(self, e: errors.SpecdraftError, context: grpc.ServicerContext) -> None:
        status, message = answer(e, log, "verifier")
        code = status.grpc
        self._generator.metrics.rejected("grpc", code.name, reason_label(getattr(e, "param", None), code.name))
        if isinstance(e, QueueFull):
            context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
        context.abort(code, message)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        try:
            checked = self._checked(request, context)
            chunks = self._generator.stream(checked, "grpc", _gone(context), self._deadline(context))
        except errors.SpecdraftError as e:
            self._refuse(e, context)
        try:
            for chunk in chunks:
                yield encode_chunk(chunk)
        except errors.DeadlineExceeded as e:
            status, message = answer(e, log, "verifier")
            context.abort(status.grpc, message)
        finally:
            chunks.close()
