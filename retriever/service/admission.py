"""Overload control of the retriever: three bounds and deadlines.

1. `StreamSlots(max_streams, max_per_peer)` (this module): open DraftStreams, a cap of their
   own, apart from the drafting cap below: at most `max_streams` in all and `max_per_peer` per
   client address; beyond either a new stream is refused at once (RESOURCE_EXHAUSTED, "open
   DraftStreams ... must be at most N, got N+1"). grpc itself caps no RPCs (no
   `maximum_concurrent_rpcs`): open streams never crowd out unary calls or health checks, and
   unary calls are bounded by the admission below, which refuses at once beyond its queue.
   A stream without a request for `stream_idle_s` is ended by the servicer (with its sessions).
2. `Admission(max_inflight, max_queued)` (this module), at the servicer's edge, per drafted
   message: an asyncio semaphore with a bounded FIFO of waiters (one per server, used only
   on its event loop: not thread-safe). `await enter()` takes a slot: at once while fewer
   than `max_inflight` calls hold one, else after waiting its turn; with `max_queued` already
   waiting it raises `Overloaded` (RESOURCE_EXHAUSTED, counted as "overloaded") at once.
   `leave()` gives the slot back, handing it to the oldest waiter. A call cancelled while
   waiting (client cancel, deadline) leaves no trace. When the server is busy (another call
   holds a slot, or the last one left under BUSY_GAP_S ago) a slot taken at once still yields
   to the loop once, so calls that arrived in the same loop turn are counted together; an
   idle server drafts at once (a loop turn costs ~0.1 ms of latency on a small machine).

3. `QueueWait` (this module), for the backlog neither bound sees: drafting runs on the one
   event loop, and grpc takes a call into Python only when the loop asks for the next one, so
   under saturation calls wait inside grpc core, and every one of them would be answered after
   that wait. A request that carries its send time (`DraftRequest.sent_unix_us`) and waited longer
   than `max_queue_wait_ms` is refused (RESOURCE_EXHAUSTED, counted as "queue_wait") as soon as it is read,
   before anything else is done for it. Accepted calls stay fast when refused callers back off
   (a speculative-decoding client simply decodes that step without a draft): the backlog drains.
- `check_deadline(time_remaining)`: raises `DeadlineExceeded` when a call's deadline has
  passed by the time it gets its turn (the call is then not drafted, no state changes).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from retriever import errors

BUSY_GAP_S = 200e-6  # a call entering sooner than this after the last one left finds the server busy


@dataclass(frozen=True)
class AdmissionStats:
    """Calls holding a slot and calls waiting for one, now."""

    inflight: int
    queued: int


class Admission:
    """At most `max_inflight` calls hold a slot; at most `max_queued` wait (FIFO) for one."""

    def __init__(self, max_inflight: int, max_queued: int) -> None:
        if max_inflight < 1 or max_queued < 0:
            raise ValueError(f"max_inflight must be >= 1 and max_queued >= 0, got {max_inflight} and {max_queued}")
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self._inflight = 0
        self._idle_since_s = -math.inf  # perf_counter when the last slot went back to the pool
        self._waiters: deque[asyncio.Future[None]] = deque()

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self._inflight, len(self._waiters))

    def enter_nowait(self) -> bool:
        """Takes a slot if one is free and nobody waits (no yield); False otherwise."""
        if self._inflight < self.max_inflight and not self._waiters:
            self._inflight += 1
            return True
        return False

    async def enter(self) -> None:
        """Takes a slot (see the module doc); raises Overloaded when the queue is full."""
        if self.enter_nowait():
            if self._inflight > 1 or time.perf_counter() - self._idle_since_s < BUSY_GAP_S:
                try:
                    await asyncio.sleep(0)  # busy: let this loop turn's arrivals be counted
                except BaseException:  # cancelled at the yield: the slot goes back
                    self.leave()
                    raise
            return
        if len(self._waiters) >= self.max_queued:
            raise errors.Overloaded(f"calls must be at most {self.max_inflight} in flight and {self.max_queued} "
                                    f"queued, got {self._inflight} in flight and {len(self._waiters)} queued")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn  # leave() hands its slot over: _inflight stays
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave()  # handed the slot, then cancelled before running
            else:
                self._remove(turn)
            raise

    def leave(self) -> None:
        """Gives a slot back: to the oldest live waiter, else to the pool."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._inflight -= 1
        self._idle_since_s = time.perf_counter()

    def _remove(self, turn: "asyncio.Future[None]") -> None:
        try:
            self._waiters.remove(turn)
        except ValueError:
            pass


def peer_address(peer: str) -> str:
    """The client address of a grpc peer string, port dropped ("ipv4:1.2.3.4:5" -> "ipv4:1.2.3.4";
    "ipv6:[::1]:5" -> "ipv6:[::1]"; others, e.g. "unix:/path", as they are)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class StreamSlots:
    """Open DraftStreams: at most `max_streams` in all, `max_per_peer` per client address
    (`peer_address`). One per server, used on its event loop only: not thread-safe."""

    def __init__(self, max_streams: int, max_per_peer: int) -> None:
        if max_streams < 1 or max_per_peer < 1:
            raise ValueError(f"max_streams and max_per_peer must be >= 1, got {max_streams} and {max_per_peer}")
        self.max_streams, self.max_per_peer = max_streams, max_per_peer
        self.open_streams = 0
        self._per_peer: dict[str, int] = {}

    def open(self, peer: str) -> str:
        """Takes a slot for a stream from `peer` (a grpc peer string); returns the address to `close`
        with. Raises ResourceExhausted when the total or the address's cap is reached."""
        address = peer_address(peer)
        held = self._per_peer.get(address, 0)
        if held >= self.max_per_peer:
            raise errors.ResourceExhausted(f"open DraftStreams from {address} must be at most {self.max_per_peer}, "
                                           f"got {held + 1}: end idle streams before opening more")
        if self.open_streams >= self.max_streams:
            raise errors.ResourceExhausted(f"open DraftStreams must be at most {self.max_streams}, "
                                           f"got {self.open_streams + 1}: retry after a backoff")
        self._per_peer[address] = held + 1
        self.open_streams += 1
        return address

    def close(self, address: str) -> None:
        """Gives back a slot taken by `open(...)` (returned `address`)."""
        held = self._per_peer.pop(address, 0) - 1
        if held > 0:
            self._per_peer[address] = held
        self.open_streams -= 1


class QueueWait:
    """How long requests waited before the server read them, from the clients' send times.

    A request's one-way delay is the server's wall clock minus its `sent_unix_us`; its wait is
    that delay less the smallest delay seen from the same peer (connection) over the last one to
    two windows, so a constant clock skew between the hosts cancels out and slow drift is followed.
    Remembers at most `max_peers` peers (the least recently seen is forgotten). Not thread-safe.

    Example: from a peer whose clock runs 3 s behind, requests seen 3.0001 s, 3.0002 s and 3.0121 s
    late waited 0, 0.1 and 12 ms: `wait_us` returns 0, 100 and 12_000.
    """

    def __init__(self, max_wait_us: int, window_s: float = 10.0, max_peers: int = 4096) -> None:
        if max_wait_us < 0 or window_s <= 0 or max_peers < 1:
            raise ValueError(f"max_wait_us must be >= 0, window_s > 0 and max_peers >= 1, got {max_wait_us}, "
                             f"{window_s} and {max_peers}")
        self.max_wait_us, self._window_us, self._max_peers = max_wait_us, int(window_s * 1e6), max_peers
        self._peers: OrderedDict[str, list[int]] = OrderedDict()  # peer -> [window start, min now, min before] (us)

    def wait_us(self, peer: str, sent_unix_us: int, now_unix_us: int) -> int:
        """The request's wait (us, >= 0); records its delay as the peer's baseline when it is the fastest."""
        delay = now_unix_us - sent_unix_us
        seen = self._peers.get(peer)
        if seen is None:
            self._peers[peer] = [now_unix_us, delay, delay]
            if len(self._peers) > self._max_peers:
                self._peers.popitem(last=False)
            return 0
        self._peers.move_to_end(peer)
        if now_unix_us - seen[0] >= self._window_us:
            seen[:] = [now_unix_us, delay, seen[1]]
        elif delay < seen[1]:
            seen[1] = delay
        return delay - min(seen[1], seen[2])

    def check(self, peer: str, sent_unix_us: int) -> None:
        """Raises Overloaded when a request sent at `sent_unix_us` (0: unknown, never refused) waited too long."""
        if not sent_unix_us or not self.max_wait_us:
            return
        wait = self.wait_us(peer, sent_unix_us, time.time_ns() // 1000)
        if wait > self.max_wait_us:
            raise errors.Overloaded(f"request must wait at most {self.max_wait_us / 1e3:g} ms before the server reads "
                                    f"it, got {wait / 1e3:.1f} ms: the server is overloaded, retry after a backoff")


def check_deadline(time_remaining: float | None) -> None:
    """Raises DeadlineExceeded when `time_remaining` (seconds; None: no deadline) is not positive."""
    if time_remaining is not None and time_remaining <= 0:
        raise errors.DeadlineExceeded(f"deadline must not have passed when the call is drafted, got "
                                      f"{-time_remaining:.3f} s past it")
