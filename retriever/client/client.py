"""Python client of the retriever (`specdraft.v1.Retriever`), for the verifier and the adapters.

- `RetrieverClient(target, deadline_s, security=ChannelSecurity(...))`: `target` is one or more seed
  addresses ("h1:p1,h2:p2"); channels (TLS, mTLS and a bearer token as `retriever.client.channel`
  says; default plaintext) are opened per replica. With placement (several replicas sharing tenants,
  `retriever.client.routing.Targets`) each tenant's calls go to an owner of the tenant; a call refused
  UNAVAILABLE or FAILED_PRECONDITION "not an owner" (errors.NotOwner) is re-sent to the next owner
  (`draft_batch` groups its calls by owner). Unary helpers `draft`, `draft_batch`,
  `end_session`, `describe` raise the domain errors of `retriever.errors` (mapped back from
  status codes by `retriever.status.error_of`); they return typed values (`DraftReply` holds a
  `retriever.drafting.types.DraftTree`).
- `client.session(tenant)` -> `DraftStreamSession` (`retriever.client.stream`): one generation's
  drafts over one `DraftStream`; it never fails a generation.
- `client.close()`: waits for the sessions' background ends, then for the calls in flight, then
  closes the channel (grpc crashes the process when a channel closes while another thread starts a
  call on it); later calls raise errors.Unavailable.
- `client.refusals` (`retriever.client.channel.Refusals`): the retriever's UNAUTHENTICATED /
  PERMISSION_DENIED answers to the sessions, logged once; drafting for a refused tenant (every
  tenant after UNAUTHENTICATED) holds off for `auth_retry_s`, generations decode plainly meanwhile.

Statuses become domain errors through the one table, `retriever.status.error_of`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import grpc

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever import errors
from retriever.client.channel import ChannelSecurity, Refusals, open_channel
from retriever.client.conversions import draft_request, tree_from_proto
from retriever.client.routing import Targets, split_seeds
from retriever.client.stream import DraftStreamSession
from retriever.drafting.types import DraftTree
from retriever.status import error_of

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    address: str
    capacity: int


def _raise_from(e: grpc.RpcError) -> errors.SpecdraftError:
    return error_of(e.code(), e.details() or "")


@dataclass(frozen=True)
class DraftReply:
    tree: DraftTree
    context_tokens: int


@dataclass(frozen=True)
class DraftCall:
    """One session step of `draft_batch` (prompt given: (re)start the session)."""

    tenant: str
    session_id: str
    prompt: Sequence[int] | None = None
    new_tokens: Sequence[int] = ()
    max_nodes: int = 0


@dataclass(frozen=True)
class IndexDescription:
    name: str
    kind: str
    tokens: int
    documents: int
    tokenizer_name: str
    tokenizer_sha256: str
    vocab_size: int
    path: str


@dataclass(frozen=True)
class RetrieverLimits:
    default_max_nodes: int
    max_nodes_cap: int
    vocab_size: int
    max_context_tokens: int
    max_new_tokens: int
    max_batch: int
    max_sessions: int
    tenant_token_budget: int


@dataclass(frozen=True)
class Description:
    version: str
    indexes: tuple[IndexDescription, ...]
    limits: RetrieverLimits
    ready: bool
    members: tuple[ReplicaInfo, ...] = ()  # placement: the live replicas (empty: no placement)
    replica_id: str = ""  # the replica that answered
    owners_per_tenant: int = 0  # 0: no placement
    owners: tuple[ReplicaInfo, ...] = ()  # the asked tenant's owners, best first


class _Lifecycle:
    """A client's open -> closing -> closed: counts the calls in flight and the sessions ending in the
    background, so that the channel closes only once no thread can still start a call on it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._cond = threading.Condition()
        self._calls = self._ends = 0
        self._closing = self._closed = False

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Around the start (or the whole) of a call; raises errors.Unavailable once closed."""
        with self._cond:
            if self._closed:
                raise errors.Unavailable(f"retriever client of {self.target} must be open, got a call after close()")
            self._calls += 1
        try:
            yield
        finally:
            with self._cond:
                self._calls -= 1
                self._cond.notify_all()

    def ending(self) -> bool:
        """Registers a session end run in the background (False once closing: the end is skipped)."""
        with self._cond:
            if self._closing:
                return False
            self._ends += 1
            return True

    def ended(self) -> None:
        with self._cond:
            self._ends -= 1
            self._cond.notify_all()

    def close(self, timeout_s: float) -> bool:
        """Waits (each phase up to timeout_s) for the ends, then the calls; True when none is left."""
        with self._cond:
            self._closing = True
            self._cond.wait_for(lambda: self._ends == 0, timeout_s)
            self._closed = True
            return self._cond.wait_for(lambda: self._calls == 0, timeout_s)


class RetrieverClient:
    """A channel to one retriever; see the module docstring. Thread-safe."""

    def __init__(self, target: str | Sequence[str], deadline_s: float = 0.05, *, call_timeout_s: float = 5.0,
                 backoff_s: tuple[float, float] = (0.05, 5.0), security: ChannelSecurity | None = None,
                 auth_retry_s: float = 30.0) -> None:
        """`security`: TLS/mTLS files and the bearer token (`retriever.client.channel`); None: plaintext, no token.
        `auth_retry_s`: how long sessions hold off drafting after the retriever refused the credential."""
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        seeds = split_seeds(target)
        self.target, self.deadline_s = ",".join(seeds), deadline_s
        self.call_timeout_s, self.backoff_s = call_timeout_s, backoff_s
        self.refusals = Refusals(self.target, auth_retry_s)
        options = [("grpc.initial_reconnect_backoff_ms", int(backoff_s[0] * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(backoff_s[0] * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(backoff_s[1] * 1000))]
        self.lifecycle = _Lifecycle(self.target)
        self.targets = Targets(seeds, lambda address: open_channel(address, security, options=options),
                               min(call_timeout_s, 1.0), guard=self.lifecycle.call)
        self._channel = self.targets.channel(seeds[0])
        self._stub = self.targets.stub(seeds[0])

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Blocks until the channel connects; raises errors.Unavailable after timeout_s."""
        try:
            with self.lifecycle.call():
                grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(f"retriever at {self.target} must be reachable, got no connection in {timeout_s} s")

    def session(self, tenant: str, session_id: str | None = None) -> DraftStreamSession:
        return DraftStreamSession(self, tenant, session_id or uuid.uuid4().hex)

    def route(self, tenant: str) -> tuple[str, ...]:
        """The replicas to send `tenant`'s sessions to, best first (`Targets.route`)."""
        return self.targets.route(tenant)

    def _routed(self, tenant: str, address: str | None, call: Callable[[pb_grpc.RetrieverStub], _T]) -> _T:
        """`call` on `address`, else on the tenant's owners in turn: UNAVAILABLE or NotOwner moves to the next."""
        addresses = (address,) if address else self.route(tenant)
        for i, target in enumerate(addresses):
            try:
                with self.lifecycle.call():
                    return call(self.targets.stub(target))
            except grpc.RpcError as e:
                error = _raise_from(e)
            moves_on = isinstance(error, (errors.NotOwner, errors.Unavailable))
            if not moves_on or isinstance(error, errors.DeadlineExceeded):
                raise error
            if isinstance(error, errors.NotOwner) or len(addresses) > 1:  # one replica failing: nothing to learn
                self.targets.stale()
            if isinstance(error, errors.NotOwner):
                self.targets.hint(tenant, error.owners)
            if i == len(addresses) - 1:
                raise error
        raise AssertionError("unreachable: route() is never empty")

    def draft(self, tenant: str, session_id: str, prompt: Sequence[int] | None = None,
              new_tokens: Sequence[int] = (), max_nodes: int = 0, timeout_s: float | None = None,
              address: str | None = None) -> DraftReply:
        """One unary step (deadline: timeout_s, default deadline_s), on `address` or the tenant's owners."""
        request = draft_request(tenant, session_id, prompt, new_tokens, max_nodes)
        r = self._routed(tenant, address, lambda stub: stub.Draft(request, timeout=timeout_s or self.deadline_s))
        return DraftReply(tree_from_proto(r.tree), int(r.context_tokens))

    def draft_batch(self, calls: Sequence[DraftCall], timeout_s: float | None = None
                    ) -> list[DraftReply | errors.SpecdraftError]:
        """Many sessions' steps; a failed item is its domain error, in place. With placement the calls
        go, grouped, to their tenants' owners (one DraftBatch per replica, in turn); an item refused
        UNAVAILABLE or not-an-owner is re-sent to its tenant's next owner (a call that fails as a whole
        with another error raises it)."""
        if not calls:  # the server's answer (INVALID_ARGUMENT), as ever
            return self._batch_on(self.targets.seeds[0], calls, timeout_s)
        results: list[DraftReply | errors.SpecdraftError | None] = [None] * len(calls)
        tried: list[set[str]] = [set() for _ in calls]
        pending = list(range(len(calls)))
        while pending:
            groups: dict[str, list[int]] = {}
            for i in pending:
                route = self.route(calls[i].tenant)
                groups.setdefault(next((a for a in route if a not in tried[i]), route[0]), []).append(i)
            pending = []
            for address, items in groups.items():
                for i, item in zip(items, self._batch_on(address, [calls[i] for i in items], timeout_s)):
                    tried[i].add(address)
                    results[i] = item
                    if isinstance(item, errors.NotOwner):  # route it by the owners the refusal names
                        self.targets.stale()
                        self.targets.hint(calls[i].tenant, item.owners)
                    movable = isinstance(item, (errors.NotOwner, errors.Unavailable)) and not isinstance(
                        item, errors.DeadlineExceeded)
                    if movable and not tried[i].issuperset(self.route(calls[i].tenant)):
                        pending.append(i)
        return results  # type: ignore[return-value]

    def _batch_on(self, address: str, calls: Sequence[DraftCall], timeout_s: float | None
                  ) -> list[DraftReply | errors.SpecdraftError]:
        """One DraftBatch on `address`; a whole-call UNAVAILABLE becomes each item's error (re-sent)."""
        req = pb.DraftBatchRequest(requests=[
            draft_request(c.tenant, c.session_id, c.prompt, c.new_tokens, c.max_nodes) for c in calls])
        try:
            with self.lifecycle.call():
                r = self.targets.stub(address).DraftBatch(req, timeout=timeout_s or self.deadline_s)
        except grpc.RpcError as e:
            error = _raise_from(e)
            if isinstance(error, errors.Unavailable) and not isinstance(error, errors.DeadlineExceeded) and len(
                    self.targets.seeds) + len(self.targets.members) > 1:
                return [error] * len(calls)
            raise error from None
        return [error_of(x.error.code, x.error.message) if x.HasField("error") and x.error.code
                else DraftReply(tree_from_proto(x.tree), int(x.context_tokens)) for x in r.responses]

    def end_session(self, tenant: str, session_id: str, new_tokens: Sequence[int] = (),
                    address: str | None = None, verified_nodes: int | None = None) -> int:
        """Ends a session after reporting `new_tokens` (accepted since its last draft) and
        `verified_nodes` (of its last draft; None: all), on `address` (the replica that drafted it)
        or the tenant's owners; returns the output tokens handed to the tenant."""
        request = pb.EndSessionRequest(tenant=tenant, session_id=session_id, new_tokens=list(new_tokens))
        if verified_nodes is not None:
            request.verified_nodes = max(0, int(verified_nodes))
        r = self._routed(tenant, address, lambda stub: stub.EndSession(request, timeout=self.call_timeout_s))
        return int(r.output_tokens)

    def describe(self, tenant: str = "", address: str | None = None) -> Description:
        """The first seed's (or `address`'s) description; with `tenant`, its owners too."""
        try:
            with self.lifecycle.call():
                stub = self.targets.stub(address) if address else self._stub
                r = stub.Describe(pb.DescribeRequest(tenant=tenant), timeout=self.call_timeout_s)
        except grpc.RpcError as e:
            raise _raise_from(e) from None
        if r.owners_per_tenant:
            self.targets.learn(r)
        indexes = tuple(IndexDescription(i.name, i.kind, i.tokens, i.documents, i.tokenizer_name,
                                         i.tokenizer_sha256, i.vocab_size, i.path) for i in r.indexes)
        lim = r.limits
        limits = RetrieverLimits(lim.default_max_nodes, lim.max_nodes_cap, lim.vocab_size, lim.max_context_tokens,
                                 lim.max_new_tokens, lim.max_batch, lim.max_sessions, lim.tenant_token_budget)
        info = lambda ms: tuple(ReplicaInfo(m.replica_id, m.address, m.capacity) for m in ms)  # noqa: E731
        return Description(r.version, indexes, limits, r.ready, info(r.members), r.replica_id,
                           int(r.owners_per_tenant), info(r.owners))

    def open_stream(self, requests: Iterator[pb.DraftRequest], address: str | None = None
                    ) -> Iterator[pb.DraftResponse]:
        """A DraftStream call over `requests` to `address` (default: the first seed); raises
        errors.Unavailable once closed."""
        with self.lifecycle.call():
            return (self.targets.stub(address) if address else self._stub).DraftStream(requests)

    def close(self, timeout_s: float | None = None) -> None:
        """See the module docstring; each wait is bounded by timeout_s (default: three call timeouts, the
        longest a session end takes). Calls still running then leave the channel open (logged), never a crash."""
        if self.lifecycle.close(3 * self.call_timeout_s if timeout_s is None else timeout_s):
            self.targets.close()
        else:
            log.warning("retriever client of %s: calls still running at close(); channel left open", self.target)
