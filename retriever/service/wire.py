"""The `specdraft.v1.Retriever` method handlers, with unparseable requests answered INVALID_ARGUMENT.

grpc parses a request before the handler runs; a request that does not parse (malformed
UTF-8 in `tenant` or `session_id`, a corrupt wire encoding) would be answered UNKNOWN
"Unexpected <class DecodeError>". `add_retriever(servicer, server)` registers the servicer
like the generated `add_RetrieverServicer_to_server`, but with parsers that never raise: a
request that fails to parse is answered INVALID_ARGUMENT "request must be a valid
specdraft.v1.DraftRequest, got N bytes that do not parse (REASON)" before the servicer
(and its auth guard) sees it, so it leaves no state behind. In a DraftStream the requests
before the bad one are answered, then the stream ends with that status.

Handlers may answer with bytes, a response already serialized (the core encodes drafts:
`Drafter.draft_response`); `encode_batch` joins serialized DraftResponses into a DraftBatchResponse.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from protos.specdraft.v1 import retriever_pb2 as pb
from retriever import errors
from retriever.status import code_of

SERVICE = pb.DESCRIPTOR.services_by_name["Retriever"]
RPC_LABELS = {"Draft": "draft", "DraftStream": "stream", "DraftBatch": "batch", "EndSession": "end_session",
              "Describe": "describe"}  # the rpc label of the metrics' rejections
OnReject = Callable[[str, str, str], None]  # (rpc label, status code name, message)


class Malformed:
    """Stands in for a request that did not parse; `error` says why (an InvalidArgument)."""

    __slots__ = ("error",)

    def __init__(self, message: str) -> None:
        self.error = errors.InvalidArgument(message)


def parser(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns a `Malformed` instead of raising DecodeError."""
    name = message_class.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return message_class.FromString(raw)
        except DecodeError as e:
            reason = str(e).rsplit(": ", 1)[-1] or "corrupt wire format"
            return Malformed(f"request must be a valid {name}, got {len(raw)} bytes that do not parse ({reason})")
    return parse


def serialize(response: Any) -> bytes:
    """A response's wire bytes: bytes as they are, a protobuf message serialized."""
    return response if type(response) is bytes else response.SerializeToString()


def varint(value: int) -> bytes:
    """The protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_batch(responses: list[bytes]) -> bytes:
    """The bytes of a DraftBatchResponse holding these serialized DraftResponses, in order."""
    return b"".join(b"\x0a" + varint(len(r)) + r for r in responses)  # field 1, length-delimited


async def _refuse(context: grpc.aio.ServicerContext, label: str, error: errors.InvalidArgument,
                  on_reject: OnReject | None) -> None:
    if on_reject is not None:
        on_reject(label, code_of(error).name, str(error))
    await context.abort(code_of(error), str(error))


def _unary(behavior: Callable[..., Any], label: str, on_reject: OnReject | None) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await _refuse(context, label, request.error, on_reject)
        return await behavior(request, context)
    return handle


def _stream(behavior: Callable[..., Any], label: str, on_reject: OnReject | None) -> Callable[..., Any]:
    async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        bad: list[Malformed] = []

        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):
                    bad.append(request)
                    return
                yield request

        async for response in behavior(parsed(), context):
            yield response
        if bad:
            await _refuse(context, label, bad[0].error, on_reject)
    return handle


def method_handlers(servicer: Any, on_reject: OnReject | None = None) -> dict[str, grpc.RpcMethodHandler]:
    """The handler of every Retriever method (unary-unary or stream-stream, as the proto says)."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        behavior, label = getattr(servicer, method.name), RPC_LABELS.get(method.name, method.name.lower())
        options = dict(request_deserializer=parser(request_class), response_serializer=serialize)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_stream(behavior, label, on_reject),
                                                                          **options)
        elif not (method.client_streaming or method.server_streaming):
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(behavior, label, on_reject),
                                                                        **options)
        else:
            raise NotImplementedError(f"Retriever.{method.name} must be unary-unary or stream-stream")
    return handlers


def add_retriever(servicer: Any, server: grpc.aio.Server, on_reject: OnReject | None = None) -> None:
    """Registers `servicer` as specdraft.v1.Retriever on `server` (see the module docstring);
    `on_reject(rpc, code, message)` is told of each request that did not parse."""
    handlers = method_handlers(servicer, on_reject)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
