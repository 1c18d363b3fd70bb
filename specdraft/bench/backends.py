"""Ways to reach a drafter from a benchmark: in-process, gRPC unary, gRPC stream.

A `Backend` opens one `Session` per generation. `Session.draft` takes the prompt (first
call, or a restart) or the tokens accepted since the previous call and returns the draft
tree; it records the wall time of the drafting call itself in `latencies_ns`. A session
whose server forgot it (NOT_FOUND) is restarted transparently with its full context.
`Session.end(final_tokens)` hands the last accepted tokens over, then ends the session.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from retriever.drafting.drafter import Drafter

_FLUSH_NODES = 1  # node budget of the call that only hands over the final tokens


@dataclass(frozen=True)
class Tree:
    """The part of a draft a benchmark reads."""

    token_ids: np.ndarray  # int32[n]
    parents: np.ndarray  # int32[n]


class Session(Protocol):
    latencies_ns: list[int]

    def draft(self, prompt: np.ndarray | None, new_tokens: np.ndarray, max_nodes: int) -> Tree: ...

    def end(self, final_tokens: np.ndarray) -> int: ...


class Backend(Protocol):
    name: str

    def session(self, tenant: str, session_id: str) -> Session: ...

    def close(self) -> None: ...


class _Context:
    """The session's prompt and output so far, kept client-side to restart a forgotten
    session: the restart resends the prompt as prompt and the output as new_tokens, so
    the whole output still becomes the tenant's prior output."""

    def __init__(self) -> None:
        self.prompt = np.empty(0, np.int32)
        self._output: list[np.ndarray] = []

    def add(self, prompt: np.ndarray | None, new_tokens: np.ndarray) -> None:
        if prompt is not None:
            self.prompt, self._output = prompt, []
        if len(new_tokens):
            self._output.append(new_tokens)

    def output(self) -> np.ndarray:
        return np.concatenate(self._output).astype(np.int32) if self._output else np.empty(0, np.int32)


def open_indexes(paths: Sequence[str]) -> list:
    """`retriever.store.datastore.open_datastore` of each path (none: no import at all)."""
    if not paths:
        return []
    from retriever.store.datastore import open_datastore

    return [open_datastore(p) for p in paths]


# ---------------------------------------------------------------- in-process


class InProcessSession:
    """Calls `Drafter.draft` directly; latencies are the draft call alone."""

    def __init__(self, drafter: "Drafter", tenant: str, session_id: str) -> None:
        self._drafter, self._tenant, self._sid = drafter, tenant, session_id
        self._context = _Context()
        self.latencies_ns: list[int] = []
        self.restarts = 0

    def draft(self, prompt: np.ndarray | None, new_tokens: np.ndarray, max_nodes: int) -> Tree:
        from retriever.errors import NotFound

        self._context.add(prompt, new_tokens)
        try:
            t0 = time.perf_counter_ns()
            result = self._drafter.draft(self._tenant, self._sid, prompt, new_tokens, max_nodes)
            self.latencies_ns.append(time.perf_counter_ns() - t0)
        except NotFound:
            self.restarts += 1
            result = self._drafter.draft(self._tenant, self._sid, self._context.prompt, self._context.output(),
                                         max_nodes)
        return Tree(result.tree.token_ids, result.tree.parents)

    def end(self, final_tokens: np.ndarray) -> int:
        if len(final_tokens):  # untimed: not a drafting step
            n = len(self.latencies_ns)
            self.draft(None, final_tokens, _FLUSH_NODES)
            del self.latencies_ns[n:]
        return self._drafter.end_session(self._tenant, self._sid)


class InProcessBackend:
    """A `retriever.drafting.drafter.Drafter` in this process."""

    name = "in-process"

    def __init__(self, drafter: "Drafter") -> None:
        self.drafter = drafter

    @classmethod
    def open(cls, indexes: Sequence[str] = ()) -> "InProcessBackend":
        """A drafter configured as a default server's, over the datastores at `indexes`."""
        from retriever.drafting.drafter import Drafter
        from retriever.service.settings import RetrieverSettings

        return cls(Drafter(RetrieverSettings().drafter_config(), open_indexes(indexes)))

    def session(self, tenant: str, session_id: str) -> InProcessSession:
        return InProcessSession(self.drafter, tenant, session_id)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- gRPC


def _tree(response) -> Tree:
    t = response.tree
    return Tree(np.asarray(t.token_ids, np.int32), np.asarray(t.parents, np.int32))


class _GrpcSession:
    """Common gRPC session logic: request building, NOT_FOUND restart, EndSession."""

    def __init__(self, stub, tenant: str, session_id: str) -> None:
        self._stub, self._tenant, self._sid = stub, tenant, session_id
        self._context = _Context()
        self.latencies_ns: list[int] = []
        self.restarts = 0

    def _request(self, prompt: np.ndarray | None, new_tokens: np.ndarray, max_nodes: int):
        from protos.specdraft.v1 import retriever_pb2 as pb

        return pb.DraftRequest(
            tenant=self._tenant, session_id=self._sid, max_nodes=max_nodes,
            prompt=prompt.tolist() if prompt is not None else (), new_tokens=new_tokens.tolist())

    def _call(self, request):  # one timed round trip; raises grpc.RpcError
        raise NotImplementedError

    def draft(self, prompt: np.ndarray | None, new_tokens: np.ndarray, max_nodes: int) -> Tree:
        import grpc

        self._context.add(prompt, new_tokens)
        try:
            return _tree(self._call(self._request(prompt, new_tokens, max_nodes)))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        self.restarts += 1
        self._restart_stream()
        request = self._request(self._context.prompt, self._context.output(), max_nodes)
        return _tree(self._call(request))

    def _restart_stream(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def end(self, final_tokens: np.ndarray) -> int:
        from protos.specdraft.v1 import retriever_pb2 as pb

        if len(final_tokens):  # untimed: not a drafting step
            n = len(self.latencies_ns)
            self.draft(None, final_tokens, _FLUSH_NODES)
            del self.latencies_ns[n:]
        self._close()
        return int(self._stub.EndSession(pb.EndSessionRequest(tenant=self._tenant, session_id=self._sid)).output_tokens)


class UnarySession(_GrpcSession):
    """One unary `Draft` call per step."""

    def _call(self, request):
        t0 = time.perf_counter_ns()
        response = self._stub.Draft(request)
        self.latencies_ns.append(time.perf_counter_ns() - t0)
        return response


class StreamSession(_GrpcSession):
    """One `DraftStream` per generation; one request and one response per step."""

    def __init__(self, stub, tenant: str, session_id: str) -> None:
        super().__init__(stub, tenant, session_id)
        self._requests: queue.SimpleQueue | None = None
        self._responses: Iterator | None = None

    def _open(self) -> None:
        self._requests = queue.SimpleQueue()
        requests = self._requests
        self._responses = self._stub.DraftStream(iter(requests.get, None))

    def _call(self, request):
        if self._responses is None:
            self._open()
        t0 = time.perf_counter_ns()
        self._requests.put(request)
        response = next(self._responses)
        self.latencies_ns.append(time.perf_counter_ns() - t0)
        return response

    def _restart_stream(self) -> None:  # an error status has ended the stream
        self._close()

    def _close(self) -> None:
        import grpc

        if self._requests is not None:
            self._requests.put(None)
            try:
                for _ in self._responses:  # drain until the server closes its side
                    pass
            except grpc.RpcError:  # the stream already ended with an error status
                pass
        self._requests = self._responses = None


class GrpcBackend:
    """A Retriever server at `target`; `mode` is "unary" (Draft) or "stream" (DraftStream)."""

    def __init__(self, target: str, mode: str = "stream") -> None:
        import grpc

        from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc

        if mode not in ("unary", "stream"):
            raise ValueError(f"mode must be 'unary' or 'stream', got {mode!r}")
        self.name = f"grpc-{mode} {target}"
        self.mode = mode
        self._channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.RetrieverStub(self._channel)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Blocks until the channel connects (raises grpc.FutureTimeoutError)."""
        import grpc

        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def session(self, tenant: str, session_id: str) -> _GrpcSession:
        cls = StreamSession if self.mode == "stream" else UnarySession
        return cls(self.stub, tenant, session_id)

    def close(self) -> None:
        self._channel.close()
