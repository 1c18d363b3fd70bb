"""One generation's drafts over one `DraftStream` call: `DraftStreamSession`.

`RetrieverClient.session(tenant)` makes a session. The first request carries the prompt, later
ones only the tokens accepted since. It never fails a generation: a draft not answered within
`deadline_s` (or a broken stream) gives None, i.e. plain decoding for that step; a broken
stream is reopened after an exponential backoff (the channel reconnects in the background
meanwhile; a call on a channel in TRANSIENT_FAILURE fails at once), resending the session
(prompt + output so far). A step with nothing new to report is skipped (None). NOT_FOUND (the
server forgot the session) resends it at once. UNAUTHENTICATED / PERMISSION_DENIED go to the
client's `Refusals` (`retriever.client.channel`): logged once there, and no stream is opened for the
tenant while they hold (`refused`). `end()` closes the stream and calls EndSession with the
tokens not sent yet on a background thread (`closed` is set when done). A tree that breaks
the contract (`DraftTree.checked`) is logged and dropped (no draft that step).

Placement (`RetrieverClient.route`): the stream goes to the tenant's first owner; when it ends
UNAVAILABLE (the replica died or drains) or FAILED_PRECONDITION naming owners (errors.NotOwner),
the session is re-sent at once, prompt and output so far, to the next owner (`reroutes` counts
them); the backoff applies once every owner failed in a row. EndSession goes to the replica that
drafted the session last; when that one is gone (UNAVAILABLE; not a deadline, nor a durable end
that was taken but not confirmed: those are never ended twice) the session is re-sent to an owner
and ended there.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import grpc

from protos.specdraft.v1 import retriever_pb2 as pb
from retriever import errors
from retriever.client.channel import REFUSAL_CODES, Refusals
from retriever.client.conversions import draft_request, tree_from_proto
from retriever.drafting.types import DraftTree
from retriever.status import NOT_DURABLE_MARK, owners_in

log = logging.getLogger(__name__)
_REROUTED = grpc.StatusCode.ABORTED  # _drop_stream's answer when the session goes to the next owner at once


class Lifecycle(Protocol):
    def ending(self) -> bool: ...

    def ended(self) -> None: ...


class SessionCalls(Protocol):
    """What a session needs of its `RetrieverClient` (`retriever.client.client`)."""

    deadline_s: float
    call_timeout_s: float
    backoff_s: tuple[float, float]
    refusals: Refusals
    lifecycle: Lifecycle

    def route(self, tenant: str) -> tuple[str, ...]: ...

    def open_stream(self, requests: Iterator[pb.DraftRequest], address: str | None = None
                    ) -> Iterator[pb.DraftResponse]: ...

    def draft(self, tenant: str, session_id: str, prompt: Sequence[int] | None = None, new_tokens: Sequence[int] = (),
              max_nodes: int = 0, timeout_s: float | None = None, address: str | None = None) -> object: ...

    def end_session(self, tenant: str, session_id: str, new_tokens: Sequence[int] = (),
                    address: str | None = None, verified_nodes: int | None = None) -> int: ...


@dataclass(frozen=True)
class _Closed:
    """The response stream ended (error: the RpcError, None: a clean end)."""

    error: grpc.RpcError | None

    def status(self) -> tuple[grpc.StatusCode, str]:
        if self.error is None:
            return grpc.StatusCode.UNAVAILABLE, "the stream ended"
        return self.error.code(), self.error.details() or ""


class _Stream:
    """One DraftStream call: requests through a queue, responses read by a daemon thread."""

    def __init__(self, client: SessionCalls, address: str | None = None) -> None:
        """Raises errors.Unavailable when the client is closed."""
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.responses: queue.SimpleQueue = queue.SimpleQueue()
        self.outstanding = 0  # requests sent whose response was not read yet
        self.address = address
        self._call = client.open_stream(iter(self._requests.get, None), address)
        threading.Thread(target=self._read, daemon=True, name="draft-stream").start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.put(response)
            self.responses.put(_Closed(None))
        except grpc.RpcError as e:
            self.responses.put(_Closed(e))

    def send(self, request: pb.DraftRequest) -> None:
        self.outstanding += 1
        self._requests.put(request)

    def close(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        self._requests.put(None)
        self._call.cancel()


class DraftStreamSession:
    """One generation's drafts over one DraftStream (see the module docstring).

    Used by one thread. `restarts` counts sessions resent, `timeouts` drafts given up;
    after `closed` is set, `output_tokens` is EndSession's count (None if it failed). `refused`:
    the retriever refuses this tenant's drafts for now (UNAUTHENTICATED / PERMISSION_DENIED).
    """

    def __init__(self, client: SessionCalls, tenant: str, session_id: str) -> None:
        self._client, self.tenant, self.session_id = client, tenant, session_id
        self._prompt: list[int] = []
        self._prediction: list[int] = []  # the predicted output's tokens: resent with every (re)start
        self._output: list[int] = []  # every token after the prompt
        self._unsent: list[int] = []  # output not sent on the current stream yet
        self._stream: _Stream | None = None
        self._synced = False  # the server got this session on the current stream
        self._sent_at = 0.0
        self._retry_at = 0.0
        self._backoff = client.backoff_s[0]
        self._delivered = False  # the caller got the answer to the latest request as its draft
        self._verified: int | None = None  # what the next request reports on the server's last draft
        self._ended = False
        self.restarts = self.timeouts = self.reroutes = 0
        self._failed: list[str] = []  # replicas that failed this session in a row (UNAVAILABLE / not an owner)
        self._address: str | None = None  # the replica holding the session (for EndSession)
        self.output_tokens: int | None = None
        self.closed = threading.Event()

    @property
    def refused(self) -> bool:
        return self._client.refusals.held(self.tenant)

    def start(self, prompt_ids: Sequence[int], prediction_ids: Sequence[int] = ()) -> None:
        """Begins the generation; the stream opens now, the prompt (and the predicted output's
        tokens, if any: Source.PREDICTION drafts from them) go with the first draft."""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        self._prompt, self._output, self._unsent = [int(t) for t in prompt_ids], [], []
        self._prediction = [int(t) for t in prediction_ids]
        self._delivered, self._verified = False, None
        self._open_if_due()

    def draft(self, new_tokens: Sequence[int], max_nodes: int, verified_nodes: int | None = None
              ) -> DraftTree | None:
        """Reports the tokens emitted since the last call, and how many nodes of the draft it
        returned were verified (None: not said, i.e. all); the draft, or None (no draft this step).
        A draft the caller never got (late, dropped) is reported as 0 nodes verified."""
        if self._ended:
            return None
        self._note_verified(verified_nodes)
        tokens = [int(t) for t in new_tokens]
        self._output += tokens
        self._unsent += tokens
        if max_nodes <= 0 or not self._open_if_due() or self._behind() or (self._synced and not self._unsent):
            return None
        deadline = time.monotonic() + self._client.deadline_s
        self._send(max_nodes)
        for _ in range(2 + len(self._route())):  # the first answer, or resends (NOT_FOUND, another owner)
            item = self._wait(deadline)
            if item is None:
                self.timeouts += 1
                return None
            if not isinstance(item, _Closed):
                self._backoff, self._failed = self._client.backoff_s[0], []
                self._client.refusals.accepted(self.tenant)
                tree = self._tree(item)
                self._delivered = tree is not None
                return tree
            code = self._drop_stream(*item.status())
            if code not in (grpc.StatusCode.NOT_FOUND, _REROUTED) or not self._open_if_due():
                return None
            self._send(max_nodes)
        return None

    def end(self, new_tokens: Sequence[int] = (), verified_nodes: int | None = None) -> None:
        """Hands over the last tokens (and `verified_nodes`, as `draft`) and ends the session, in the
        background; idempotent."""
        if self._ended:
            return
        self._note_verified(verified_nodes)
        self._ended = True
        self._output += [int(t) for t in new_tokens]
        self._unsent += [int(t) for t in new_tokens]
        if not self._client.lifecycle.ending():
            log.info("draft session %s not ended: the retriever client is closing", self.session_id)
            if self._stream is not None:
                self._stream.cancel()
            self.closed.set()
            return
        threading.Thread(target=self._finish, daemon=True, name="draft-session-end").start()

    # ------------------------------------------------------------ internals

    def _note_verified(self, verified_nodes: int | None) -> None:
        """The caller's report on the draft this session handed it last (if it did)."""
        if self._delivered:
            self._verified, self._delivered = verified_nodes, False

    def _tree(self, response: pb.DraftResponse) -> DraftTree | None:
        """The answer's tree, checked; None when empty or broken (logged)."""
        try:
            tree = tree_from_proto(response.tree)
        except errors.InvalidArgument as e:
            log.warning("draft session %s: the retriever answered a broken tree (%s); no draft this step",
                        self.session_id, e)
            return None
        return tree if len(tree) else None

    def _open_if_due(self) -> bool:
        if self._stream is not None:
            return True
        if time.monotonic() < self._retry_at or self._client.refusals.held(self.tenant):
            return False
        try:
            route = self._route()
            address = next((a for a in route if a not in self._failed), route[0])
            self._stream, self._synced = _Stream(self._client, address), False
        except errors.Unavailable:  # the client is closed
            return False
        return True

    def _route(self) -> tuple[str, ...]:
        return self._client.route(self.tenant)

    def _reroute(self, code: grpc.StatusCode, details: str, address: str | None) -> bool:
        """After UNAVAILABLE or a not-an-owner refusal: True (the next owner is tried at once) unless
        every owner failed in a row."""
        if code != grpc.StatusCode.UNAVAILABLE and not (code == grpc.StatusCode.FAILED_PRECONDITION
                                                        and owners_in(details)):
            return False
        targets, owners = getattr(self._client, "targets", None), owners_in(details)
        if targets is not None and (owners or len(self._route()) > 1):  # one replica and no refusal: nothing to learn
            targets.stale()
            if owners:
                targets.hint(self.tenant, owners)
        if address:
            self._failed.append(address)
        if all(a in self._failed for a in self._route()):
            self._failed = []
            return False
        self.reroutes += 1
        log.info("draft session %s: %s from a replica, re-sent to the next owner", self.session_id, code.name)
        return True

    def _behind(self) -> bool:
        """Drains answers that came late; True while one is still missing (the step is skipped)."""
        stream = self._stream
        while stream.outstanding:
            try:
                item = stream.responses.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Closed):
                self._drop_stream(*item.status())
                return not self._open_if_due()
            stream.outstanding -= 1
        if stream.outstanding and time.monotonic() - self._sent_at > max(1.0, 20 * self._client.deadline_s):
            self._drop_stream(grpc.StatusCode.DEADLINE_EXCEEDED)  # stalled: reconnect later
        return bool(stream.outstanding)

    def _send(self, max_nodes: int) -> None:
        if self._synced:
            request = draft_request(self.tenant, self.session_id, None, self._unsent, max_nodes,
                                    verified_nodes=self._verified)
        else:  # (re)start: the prompt, and the output so far as output
            self.restarts += self._sent_at > 0
            request = draft_request(self.tenant, self.session_id, self._prompt, self._output, max_nodes,
                                    self._prediction)
        self._stream.send(request)
        self._unsent, self._synced, self._sent_at = [], True, time.monotonic()
        self._address = self._stream.address
        self._verified, self._delivered = 0, False  # until the caller gets (and verifies) the answer

    def _wait(self, deadline: float) -> pb.DraftResponse | _Closed | None:
        """The answer to the latest request (late ones dropped), the stream's end, or None at the deadline."""
        stream = self._stream
        while True:
            try:
                item = stream.responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if isinstance(item, _Closed):
                return item
            stream.outstanding -= 1
            if stream.outstanding == 0:
                return item

    def _drop_stream(self, code: grpc.StatusCode, details: str = "") -> grpc.StatusCode:
        """Ends the stream after `code`; a refusal goes to the client's `Refusals`, others back off."""
        address = self._stream.address if self._stream is not None else None
        if self._stream is not None:
            self._stream.cancel()
        self._stream, self._synced = None, False
        if code in REFUSAL_CODES:
            self._client.refusals.refused(self.tenant, code, details)
        elif self._reroute(code, details, address):
            return _REROUTED
        elif code != grpc.StatusCode.NOT_FOUND:
            log.info("draft stream of session %s dropped (%s); retry in %.2f s", self.session_id, code.name,
                     self._backoff)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, self._client.backoff_s[1])
        return code

    def _close_stream(self, timeout_s: float) -> bool:
        """Closes the stream; True if the server has every token but the unsent ones (synced, all
        answers read, a clean end)."""
        stream = self._stream
        self._stream = None
        if stream is None or not self._synced:
            if stream is not None:
                stream.cancel()
            return False
        stream.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                item = stream.responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                stream.cancel()
                return False
            if isinstance(item, _Closed):
                return item.error is None and stream.outstanding == 0
            stream.outstanding -= 1

    def _end_resent(self) -> int:
        """(Re)starts the session with everything on an owner (routed), then ends it there."""
        timeout_s = self._client.call_timeout_s
        self._client.draft(self.tenant, self.session_id, self._prompt, self._output, 1, timeout_s=timeout_s)
        return self._client.end_session(self.tenant, self.session_id, (), None, self._verified)

    def _finish(self) -> None:
        try:
            if not self._prompt or self.refused:  # the calls would be refused too
                return
            if not self._close_stream(self._client.call_timeout_s):
                self.output_tokens = self._end_resent()
                return
            try:
                self.output_tokens = self._client.end_session(self.tenant, self.session_id, self._unsent,
                                                              self._address, self._verified)
            except errors.Unavailable as e:  # the replica went away before it took the end
                if isinstance(e, errors.DeadlineExceeded) or NOT_DURABLE_MARK in str(e):
                    raise  # it may have taken the end, or did: a re-send would count the output twice
                log.info("ending draft session %s on %s failed (%s); re-sent to an owner", self.session_id,
                         self._address, e)
                self.reroutes += 1
                self.output_tokens = self._end_resent()
        except (errors.Unauthenticated, errors.PermissionDenied) as e:
            code = REFUSAL_CODES[0] if isinstance(e, errors.Unauthenticated) else REFUSAL_CODES[1]
            self._client.refusals.refused(self.tenant, code, str(e))
        except errors.SpecdraftError as e:
            log.info("ending draft session %s failed: %s", self.session_id, e)
        finally:
            self._client.lifecycle.ended()
            self.closed.set()
