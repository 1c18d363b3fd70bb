"""Who serves which tenant: replica membership in Redis, and this replica's `Placement`.

Keys (P = prefix; both on the `{members}` slot of a cluster):
- `P:{members}:alive` sorted set replica id -> expiry (Unix ms, the registering replica's clock);
- `P:{members}:info` hash replica id -> JSON {"address", "capacity"}.
A replica re-registers every `heartbeat_s` with expiry now + `ttl_s`; members past their expiry
are not listed (and are deleted by whoever lists them), so a killed replica falls out within
`ttl_s` (clocks of the replicas must agree to well within `ttl_s`).

`Placement` runs the heartbeat (on a thread of its own) and keeps the live members; `owns(tenant)` and `owners(tenant)`
apply `retriever.placement.owners` (rendezvous hashing, `r` owners per tenant). Until the
first listing (or with the store down since) it keeps the last view; it always counts itself in.
`listed` turns True once the list has held still for `ttl_s` (replicas started together have all
registered by then: none tails every tenant because it listed itself alone first).
With one replica, or without Redis (no `Placement`), a replica owns every tenant.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass

from redis.exceptions import RedisClusterException, RedisError

from retriever.outputlog.contract import LogConfig, LogUnavailable
from retriever.outputlog.redis_log import STORE_ERRORS, forget_slots, redis_client
from retriever.placement import Member, owned_by, owners

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementConfig:
    """This replica in the membership, and how tenants are spread."""

    replica_id: str
    address: str  # advertised gRPC host:port
    ttl_s: float  # a replica not heard from this long is out (default: Settings.membership_ttl_s)
    heartbeat_s: float  # how often it re-registers (default: Settings.heartbeat_s)
    capacity: int = 1
    owners: int = 2  # replicas owning each tenant (R)

    def __post_init__(self) -> None:
        if not (self.owners >= 1 and self.capacity >= 1 and 0 < self.heartbeat_s < self.ttl_s):
            raise ValueError(f"PlacementConfig must have owners >= 1, capacity >= 1 and 0 < heartbeat_s < ttl_s, got "
                             f"{self.owners}, {self.capacity}, {self.heartbeat_s}, {self.ttl_s}")


class Membership:
    """The members' registry in Redis (see the module docstring); raises LogUnavailable."""

    def __init__(self, config: LogConfig, prefix: str = "specdraft") -> None:
        self._config = config
        self._clients: dict[asyncio.AbstractEventLoop, object] = {}  # one client per event loop using it
        self._alive, self._info = f"{prefix}:{{members}}:alive", f"{prefix}:{{members}}:info"

    @property
    def _client(self):  # the running loop's (redis-py clients are bound to the loop of their connections)
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = redis_client(self._config, self._config.timeout_s)
        return client

    async def register(self, me: Member, ttl_s: float) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(self._info, me.replica_id, json.dumps({"address": me.address, "capacity": me.capacity}))
            pipe.zadd(self._alive, {me.replica_id: int((time.time() + ttl_s) * 1000)})
            await pipe.execute()
        except STORE_ERRORS as e:
            await forget_slots(self._client)
            raise LogUnavailable(f"redis membership must be writable, got {type(e).__name__}: {e}") from None

    async def members(self) -> tuple[Member, ...]:
        """The live members, by replica id; expired ones are deleted."""
        now_ms = int(time.time() * 1000)
        try:
            expired = await self._client.zrangebyscore(self._alive, "-inf", now_ms)
            if expired:
                pipe = self._client.pipeline(transaction=False)
                pipe.zremrangebyscore(self._alive, "-inf", now_ms)
                pipe.hdel(self._info, *expired)
                await pipe.execute()
            ids = [i.decode() for i in await self._client.zrangebyscore(self._alive, now_ms, "+inf")]
            infos = await self._client.hmget(self._info, ids) if ids else []
        except STORE_ERRORS as e:
            await forget_slots(self._client)
            raise LogUnavailable(f"redis membership must be readable, got {type(e).__name__}: {e}") from None
        members = []
        for replica_id, raw in zip(ids, infos):
            if raw is not None:
                info = json.loads(raw)
                members.append(Member(replica_id, str(info["address"]), int(info["capacity"])))
        return tuple(sorted(members, key=lambda m: m.replica_id))

    async def leave(self, replica_id: str) -> None:
        try:
            await self._client.zrem(self._alive, replica_id)
            await self._client.hdel(self._info, replica_id)
        except STORE_ERRORS as e:
            raise LogUnavailable(f"redis membership must be writable, got {type(e).__name__}: {e}") from None

    async def close(self) -> None:
        """Closes the running loop's client (another loop's stays)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        try:
            if client is not None:
                await client.aclose()
        except (RedisError, RedisClusterException, OSError):
            pass


class Placement:
    """This replica's view of the members and of the tenants it owns (see the module docstring)."""

    def __init__(self, membership: Membership, config: PlacementConfig) -> None:
        self._membership, self.config = membership, config
        self.me = Member(config.replica_id, config.address, config.capacity)
        self.members: tuple[Member, ...] = (self.me,)
        self.changes = 0  # times the member list changed
        self.listed = False  # the member list held still for ttl_s (tailing may start)
        self._still_since: float | None = None  # monotonic s of the last change (None: never listed)
        self._lock = threading.Lock()  # refresh runs on the heartbeat thread and on callers' loops
        self._beater: threading.Thread | None = None

    def owns(self, tenant: str) -> bool:
        return owned_by(self.me.replica_id, tenant, self.members, self.config.owners)

    def owners(self, tenant: str) -> tuple[Member, ...]:
        return owners(tenant, self.members, self.config.owners)

    async def refresh(self) -> None:
        """One heartbeat and one listing; raises LogUnavailable (the last view stays). Any thread."""
        await self._membership.register(self.me, self.config.ttl_s)
        listed = await self._membership.members()
        members = tuple(sorted({*listed, self.me}, key=lambda m: m.replica_id))
        with self._lock:
            if members != self.members:
                log.info("placement: %d live replicas (%s)", len(members), ", ".join(m.replica_id for m in members))
                self.members, self.changes = members, self.changes + 1
                self._still_since = None
            now = time.monotonic()
            self._still_since = now if self._still_since is None else self._still_since
            self.listed = self.listed or now - self._still_since >= self.config.ttl_s

    async def run(self) -> None:
        """Heartbeats every heartbeat_s until cancelled, on a thread of its own (its own event loop
        and Redis connection): a stall of the caller's loop (a long replay, a slow read) never delays
        a heartbeat, so it never drops this replica out. Failures are logged once and retried."""
        stop = threading.Event()
        self._beater = threading.Thread(target=lambda: asyncio.run(self._beat(stop)), name="specdraft-heartbeat",
                                        daemon=True)
        self._beater.start()
        try:
            while self._beater.is_alive():
                await asyncio.sleep(0.05)
        finally:
            stop.set()

    async def _beat(self, stop: threading.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self.refresh()
                failing = False
            except Exception as e:  # noqa: BLE001 - the heartbeat must outlive any store failure
                if not failing:
                    log.warning("placement: membership unreachable, keeping %d members: %s", len(self.members), e,
                                exc_info=None if isinstance(e, LogUnavailable) else e)
                failing = True
            until = time.monotonic() + self.config.heartbeat_s
            while not stop.is_set() and time.monotonic() < until:
                await asyncio.sleep(min(0.02, self.config.heartbeat_s))
        await self._membership.close()

    async def leave(self) -> None:
        """Deregisters (at shutdown, after `run` was cancelled: the others take over at once instead
        of after ttl_s)."""
        if self._beater is not None:  # its last heartbeat must not come after the leave
            await asyncio.to_thread(self._beater.join, 2.0 * self.config.ttl_s)
        try:
            await self._membership.leave(self.me.replica_id)
        except LogUnavailable as e:
            log.warning("placement: could not deregister %s: %s", self.me.replica_id, e)
        await self._membership.close()
