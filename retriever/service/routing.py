"""Routing by placement: which tenants this replica drafts, and what Describe tells clients.

`Routing(sync)` over a `LogSync` with a `Placement` (`retriever.outputlog.membership`):
`check(tenant)` passes for a tenant this replica owns and has replayed; a tenant owned by others
raises `errors.NotOwner` (FAILED_PRECONDITION) and one still being replayed here
`errors.Unavailable`, both messages ending "(owners: host:port,...)" (best first) so the client
re-sends the session to the next owner; never a silent empty draft. `fill(response, tenant)` adds
the members, this replica's id, R and the tenant's owners to a DescribeResponse.
"""

from __future__ import annotations

from protos.specdraft.v1 import retriever_pb2 as pb
from retriever import errors
from retriever.outputlog.sync import LogSync
from retriever.placement import Member
from retriever.status import OWNERS_MARK


def _members(members: tuple[Member, ...]) -> list[pb.ReplicaMember]:
    return [pb.ReplicaMember(replica_id=m.replica_id, address=m.address, capacity=m.capacity) for m in members]


class Routing:
    """See the module docstring; until `sync.placement` is set every tenant passes."""

    def __init__(self, sync: LogSync) -> None:
        self._sync = sync

    def check(self, tenant: str) -> None:
        placement = self._sync.placement
        if placement is None or self._sync.ready(tenant):
            return
        owners = placement.owners(tenant)
        named = f"{OWNERS_MARK}{','.join(m.address for m in owners)})"
        me = placement.me.replica_id
        if any(m.replica_id == me for m in owners):
            raise errors.Unavailable(f"tenant {tenant!r} must be replayed from the output log on replica {me} "
                                     f"before it drafts, got it still warming up {named}")
        raise errors.NotOwner(f"tenant {tenant!r} must be drafted by one of its {len(owners)} owners, got replica "
                              f"{me}, which does not own it {named}", tuple(m.address for m in owners))

    def fill(self, response: pb.DescribeResponse, tenant: str) -> None:
        placement = self._sync.placement
        if placement is None:
            return
        response.members.extend(_members(placement.members))
        response.replica_id = placement.me.replica_id
        response.owners_per_tenant = placement.config.owners
        if tenant:
            response.owners.extend(_members(placement.owners(tenant)))
