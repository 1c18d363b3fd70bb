"""Which replicas own a tenant: weighted rendezvous (highest-random-weight) hashing. Pure.

Every replica and every client computes the same owners from the same membership, with no
coordination: each member scores each tenant, the `r` highest scores own it. A member that
leaves only hands its own tenants to the next-highest scorers; one that joins takes only the
tenants it now scores highest for (about r / n of them). The score of member m for tenant t is
`capacity(m) / -ln(u)`, u = a 64-bit hash of (m, t) mapped into (0, 1): members with twice the
capacity own about twice the tenants (weighted rendezvous hashing, Schindelhauer & Schomaker).

    >>> ms = [Member("a", "h:1"), Member("b", "h:2"), Member("c", "h:3")]
    >>> [m.replica_id for m in owners("acme", ms, 2)]  # best first
    ['a', 'c']
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Member:
    """One live retriever replica as it registered itself."""

    replica_id: str
    address: str  # its advertised gRPC host:port
    capacity: int = 1  # relative share of tenants (>= 1)


def unit_hash(replica_id: str, tenant: str) -> float:
    """A stable pseudo-random number in (0, 1) for the pair (blake2b, 64 bits)."""
    digest = hashlib.blake2b(f"{replica_id}\0{tenant}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def score(member: Member, tenant: str) -> float:
    """The member's weight for the tenant: capacity / -ln(u); higher wins."""
    return max(1, member.capacity) / -math.log(unit_hash(member.replica_id, tenant))


def owners(tenant: str, members: Sequence[Member], r: int) -> tuple[Member, ...]:
    """The min(r, len(members)) members with the highest scores for `tenant`, best first (ties: the
    smaller replica id first). The same for any order of `members`."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    return tuple(heapq.nsmallest(r, members, key=lambda m: (-score(m, tenant), m.replica_id)))


def owned_by(replica_id: str, tenant: str, members: Sequence[Member], r: int) -> bool:
    """True if `replica_id` is one of the tenant's owners."""
    return any(m.replica_id == replica_id for m in owners(tenant, members, r))
