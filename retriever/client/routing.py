"""Which retriever replica a client sends a tenant's session to: `Targets`.

A client starts from one or more seed addresses ("h1:p1,h2:p2"). It learns the membership from
a seed's Describe (`members`, `owners_per_tenant`): with placement on, the owners of a tenant are
computed here as on the replicas (`retriever.placement.owners`, rendezvous hashing); without it
(owners_per_tenant 0, an older server, or no answer) every session goes to the seeds, first
seed first. The membership is asked on a background thread (a route never waits for it): at the
first route when there are several seeds (one seed: only once a replica refused or failed, so a
client of a single retriever makes no extra call), again after `refresh_s`, and soon (at most every
`min_refresh_s`) after a replica refused a tenant or could not be reached (`stale()`). Until it is
known, a refusal's owners (`hint`) route the tenant. Channels are opened per address on first use
and kept. Thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, ContextManager, Sequence

import grpc

from protos.specdraft.v1 import retriever_pb2 as pb
from protos.specdraft.v1 import retriever_pb2_grpc as pb_grpc
from retriever.placement import Member, owners

log = logging.getLogger(__name__)


def split_seeds(target: str | Sequence[str]) -> tuple[str, ...]:
    """"h1:p1, h2:p2" or ["h1:p1", "h2:p2"] -> ("h1:p1", "h2:p2"); ValueError when empty."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    seeds = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not seeds:
        raise ValueError(f"target must name at least one host:port, got {target!r}")
    return seeds


class Targets:
    """The seeds, the learnt members, and one channel per address (see the module docstring)."""

    def __init__(self, seeds: tuple[str, ...], open_channel: Callable[[str], grpc.Channel],
                 call_timeout_s: float = 1.0, refresh_s: float = 10.0, min_refresh_s: float = 0.2,
                 guard: Callable[[], ContextManager[None]] = contextlib.nullcontext) -> None:
        """`guard`: around each background call (the client's lifecycle: raises once it is closed)."""
        self.seeds, self._open, self._guard = seeds, open_channel, guard
        self._hints: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._learner: threading.Thread | None = None
        self._timeout_s, self._refresh_s, self._min_refresh_s = call_timeout_s, refresh_s, min_refresh_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, pb_grpc.RetrieverStub] = {}
        self.members: tuple[Member, ...] = ()
        self.owners_per_tenant = 0  # 0: no placement learnt; the seeds serve every tenant
        self._learnt_s = self._tried_s = float("-inf")
        self._wanted = len(seeds) > 1  # learn the membership (one seed: once a replica refused or failed)
        self.refreshes = 0

    def stub(self, address: str) -> pb_grpc.RetrieverStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                self._channels[address] = channel = self._open(address)
                stub = self._stubs[address] = pb_grpc.RetrieverStub(channel)
            return stub

    def channel(self, address: str) -> grpc.Channel:
        self.stub(address)
        return self._channels[address]

    def route(self, tenant: str) -> tuple[str, ...]:
        """The addresses to try for `tenant`, best first: its owners, then the other members (a
        replica refusing with newer knowledge names the owners anyway); the seeds without placement."""
        self._maybe_learn()
        if not self.owners_per_tenant or not self.members:
            hinted = self._hints.get(tenant, ())
            return (*hinted, *(s for s in self.seeds if s not in hinted))
        ranked = owners(tenant, self.members, len(self.members))
        return tuple(m.address for m in ranked)

    def stale(self) -> None:
        """A replica refused or failed: ask for the membership again on the next route."""
        self._learnt_s, self._wanted = float("-inf"), True

    def hint(self, tenant: str, owners: Sequence[str]) -> None:
        """A refusal named the tenant's owners: route it there until the membership is known."""
        with self._lock:
            self._hints[tenant] = tuple(owners)
            while len(self._hints) > 1024:
                self._hints.popitem(last=False)

    def _maybe_learn(self) -> None:
        now = time.monotonic()
        if not self._wanted or now - self._learnt_s < self._refresh_s or now - self._tried_s < self._min_refresh_s:
            return
        with self._lock:
            if self._learner is not None and self._learner.is_alive():
                return
            self._tried_s = now
            self._learner = threading.Thread(target=self._learn_now, daemon=True, name="retriever-membership")
            self._learner.start()

    def _learn_now(self) -> None:
        """One Describe on a known member or a seed, the first that answers."""
        for address in dict.fromkeys((*(m.address for m in self.members), *self.seeds)):
            try:
                with self._guard():
                    response = self.stub(address).Describe(pb.DescribeRequest(), timeout=self._timeout_s)
            except grpc.RpcError:
                continue
            except Exception:  # noqa: BLE001 - the client closed: nothing to learn for
                return
            self.learn(response)
            return

    def learn(self, response: Any) -> None:
        """Takes the membership of a DescribeResponse."""
        members = tuple(Member(m.replica_id, m.address, max(1, m.capacity)) for m in response.members)
        if members != self.members:
            log.info("retriever placement: %d replicas, %d owners per tenant", len(members), response.owners_per_tenant)
        self.members, self.owners_per_tenant = members, int(response.owners_per_tenant)
        self._learnt_s = time.monotonic()
        if self.owners_per_tenant and members:
            self._hints.clear()
        self.refreshes += 1

    def owners_of(self, tenant: str) -> int:
        """How many addresses of `route(tenant)` own it (the rest are fallbacks)."""
        return min(self.owners_per_tenant, len(self.members)) if self.owners_per_tenant else len(self.seeds)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()
