"""`RedisLog`: the output log in Redis Streams, shared by every replica (see `retriever.outputlog.contract`).

Keys, per tenant T (E = T percent-encoded, so `{`, `}` and `:` never appear; the `{E}`
hash tag keeps a tenant's keys on one Redis Cluster slot):
- `P:{E}:outputs` stream, one entry per output: fields `o` (origin replica id) and `t`
  (tokens, int32 little-endian bytes);
- `P:{E}:tokens` the stream's token count (trimming reads it instead of the stream);
- `P:{E}:seqs` hash origin -> last appended seq (idempotent retries; expires after
  `dedup_ttl_s` without appends);
- `P:tenants` set of tenant names (discovery; outside the tenants' slots).
P is `prefix` (default "specdraft"). One Lua script per output checks the seq, XADDs and
trims the oldest entries by the token budget atomically (XTRIM MINID, the newest stays).
Reads are plain XREAD (no consumer groups: every replica sees every entry).

Redis Cluster: a URL `redis+cluster://[user:password@]host:port[,host:port...]` (or
`rediss+cluster://` for TLS) names seed nodes and uses redis-py's `RedisCluster`. A tenant's
three keys share its `{E}` slot, so the append script stays atomic; `P:tenants` lives on one
slot. A cluster read is one XRANGE per tenant that may have news, pipelined (the pipeline sends
each node its own commands), polled every `CLUSTER_POLL_S` until `block_ms` passed: no single
command spans slots. Which tenants may have news: the change notes of `P:{changes}`
(`retriever.outputlog.cluster_tail`), written after each acknowledged append batch.
`wait_replicas` sends WAIT to each master the batch wrote to, on the connection
that wrote (WAIT counts only that connection's writes).

Timeouts are short and redis-py's own retries are off: a failure raises `LogUnavailable`
at once; the caller (`PublishQueue`, `LogSync`) backs off and retries. Blocking reads use
their own connection pool, so a pending XREAD never delays an append.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import quote, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from retriever.outputlog.cluster_tail import ClusterTail
from retriever.outputlog.contract import (
    START,
    LogConfig,
    LogEntry,
    LogRead,
    LogSize,
    LogUnavailable,
    PendingOutput,
    decode_tokens,
)

# KEYS: stream, tokens, seqs. ARGV: origin, seq, payload, budget, dedup ttl (ms).
# Returns the new entry id, or false when (origin, seq) was appended before.
APPEND_LUA = """
local function ntok(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return string.len(fields[i + 1]) / 4 end
  end
  return 0
end
local seq = tonumber(ARGV[2])
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if seq <= last then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local total, from = 0, '-'
  while true do
    local chunk = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 512)
    if #chunk == 0 then break end
    for _, e in ipairs(chunk) do total = total + ntok(e[2]); from = '(' .. e[1] end
  end
  redis.call('SET', KEYS[2], total)
end
local id = redis.call('XADD', KEYS[1], '*', 'o', ARGV[1], 't', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], seq)
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local total = redis.call('INCRBY', KEYS[2], string.len(ARGV[3]) / 4)
local over = total - tonumber(ARGV[4])
if over <= 0 then return id end
local removed, keep, from = 0, nil, '-'
while keep == nil do
  local chunk = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 128)
  if #chunk == 0 then keep = id; break end
  for _, e in ipairs(chunk) do
    if over <= 0 or e[1] == id then keep = e[1]; break end
    local n = ntok(e[2])
    over = over - n
    removed = removed + n
    from = '(' .. e[1]
  end
end
redis.call('XTRIM', KEYS[1], 'MINID', keep)
redis.call('DECRBY', KEYS[2], removed)
return id
"""
APPEND_SHA = __import__("hashlib").sha1(APPEND_LUA.encode()).hexdigest()
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# What a store call raises when Redis cannot serve it (RedisClusterException, e.g. "cannot be
# connected" or a slot not covered, is not a RedisError).
STORE_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
CLUSTER_POLL_S = 0.05  # cluster reads: how often tailed tenants are polled while nothing is new


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


@dataclass(frozen=True)
class ClusterAddress:
    """A parsed `redis+cluster://` URL: the seed nodes, TLS, and the credentials it holds."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool
    username: str = ""
    password: str = field(default="", repr=False)


def parse_cluster_url(url: str) -> ClusterAddress:
    """`redis+cluster://[user:password@]h1:p1[,h2:p2...][/]` -> ClusterAddress; ValueError (password
    hidden) for anything else. Example: "redis+cluster://a:7000,b:7001" -> seeds (("a", 7000), ("b", 7001))."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"a cluster URL must start with redis+cluster:// or rediss+cluster://, got {redact(url)!r}")
    rest = rest.split("/", 1)[0]
    userinfo, at, hosts = rest.rpartition("@")
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    seeds = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"a cluster URL must list host:port seeds separated by commas, got {redact(url)!r}")
        seeds.append((host, int(port)))
    return ClusterAddress(tuple(seeds), scheme == "rediss+cluster", unquote(username), unquote(password))


def redact(url: str) -> str:
    """`url` with its password replaced by ***, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparsable URL>"


def tenant_tag(tenant: str) -> str:
    """The tenant's key fragment: percent-encoded UTF-8 (only [A-Za-z0-9_.~-] stay), injective."""
    return quote(tenant, safe="")


def redis_client(c: LogConfig, socket_timeout_s: float) -> "aioredis.Redis | RedisCluster":
    """A client of `c.redis_url` (a RedisCluster for redis+cluster://): short timeouts, redis-py's
    retries off, connections opened lazily; ValueError (password hidden) for a bad URL."""
    auth = {k: v for k, v in (("username", c.redis_username), ("password", c.redis_password)) if v}
    common = dict(socket_timeout=socket_timeout_s, socket_connect_timeout=c.timeout_s, retry=Retry(NoBackoff(), 0),
                  protocol=2)
    try:
        if is_cluster_url(c.redis_url):
            address = parse_cluster_url(c.redis_url)
            auth = {k: v for k, v in {"username": address.username, "password": address.password, **auth}.items() if v}
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in address.seeds], ssl=address.tls,
                                require_full_coverage=False, **auth, **common)
        return aioredis.Redis.from_url(c.redis_url, health_check_interval=0, **auth, **common)
    except ValueError as e:
        raise ValueError(f"SPECDRAFT_REDIS_URL must be a redis://, rediss://, unix:// or redis+cluster:// URL, "
                         f"got {redact(c.redis_url)!r} ({e})") from None


async def forget_slots(client: "aioredis.Redis | RedisCluster") -> None:
    """Cluster, after a failure: drops the client's connections and slot map, so the next call asks
    the cluster again (a failed-over master's slots are found on the promoted replica); redis-py's
    cluster pipelines keep the stale map otherwise. A single-node client is left alone."""
    if isinstance(client, RedisCluster):
        try:
            await client.aclose()
        except (RedisError, RedisClusterException, OSError):
            pass


class RedisLog:
    """The `OutputLog` contract over Redis or a Redis Cluster (`redis+cluster://` URL); connections
    open lazily (construction never fails on an unreachable server). `config.redis_url` must be set."""

    name = "redis"

    def __init__(self, config: LogConfig, prefix: str = "specdraft") -> None:
        if not config.redis_url:
            raise ValueError("LogConfig.redis_url must be a redis://, rediss:// or unix:// URL, got ''")
        self._config, self._prefix = config, prefix
        self.cluster = is_cluster_url(config.redis_url)
        self._tenants_key = f"{prefix}:tenants"
        wait_s = config.wait_ms / 1000.0 if config.wait_replicas else 0.0
        self._writer = self._client(config.timeout_s + wait_s)
        self._reader = self._client(config.timeout_s + (0 if self.cluster else config.block_ms / 1000.0))
        self._tail = ClusterTail(self._reader, f"{prefix}:{{changes}}")  # cluster reads only
        self._known: list[str] = []
        self._keys: dict[str, tuple[str, str, str]] = {}
        self._tenant_of: dict[bytes, str] = {}

    def _client(self, socket_timeout_s: float) -> "aioredis.Redis | RedisCluster":
        return redis_client(self._config, socket_timeout_s)

    def keys(self, tenant: str) -> tuple[str, str, str]:
        """(stream, tokens, seqs) keys of `tenant`."""
        keys = self._keys.get(tenant)
        if keys is None:
            base = f"{self._prefix}:{{{tenant_tag(tenant)}}}"
            keys = self._keys[tenant] = (f"{base}:outputs", f"{base}:tokens", f"{base}:seqs")
            self._tenant_of[keys[0].encode()] = tenant
        return keys

    async def append(self, batch: Sequence[PendingOutput]) -> None:
        if not batch:
            return
        try:
            results, waits = await self._append_pipeline(batch)
            if any(isinstance(r, NoScriptError) for r in results):  # a restarted, flushed or new server
                await self._writer.script_load(APPEND_LUA)
                results, waits = await self._append_pipeline(batch)
        except STORE_ERRORS as e:
            await forget_slots(self._writer)
            raise LogUnavailable(f"redis append must succeed, got {type(e).__name__}: {e}") from None
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            await forget_slots(self._writer)
            raise LogUnavailable(f"redis append must succeed, got {type(failed).__name__}: {failed}")
        c = self._config
        for acked in waits:
            if int(acked) < c.wait_replicas:
                raise LogUnavailable(f"redis append must reach {c.wait_replicas} replicas within {c.wait_ms} ms, "
                                     f"got {acked}")
        if self.cluster:  # after the appends were acknowledged: the readers' ordering (cluster_tail)
            await self._tail.note(self._writer, dict.fromkeys(item.tenant for item in batch))

    async def _append_pipeline(self, batch: Sequence[PendingOutput]) -> tuple[list[object], list[object]]:
        """(the writes' results, the WAIT replies): WAIT (when `wait_replicas`) goes last on each
        connection that wrote, one per master on a cluster."""
        c = self._config
        if self.cluster:
            await self._writer.initialize()
        pipe = self._writer.pipeline(transaction=False)
        tenants = list(dict.fromkeys(item.tenant for item in batch))
        for tenant in tenants:
            pipe.sadd(self._tenants_key, tenant)
        for item in batch:
            # execute_command: redis-py refuses pipe.evalsha on a cluster, routing by the 3 keys works
            pipe.execute_command("EVALSHA", APPEND_SHA, 3, *self.keys(item.tenant), item.origin, item.seq,
                                 item.payload, c.token_budget, c.dedup_ttl_s * 1000)
        writes = len(tenants) + len(batch)
        if c.wait_replicas and self.cluster:
            nodes = {n.name: n for n in (self._writer.get_node_from_key(k) for k in
                                         (self._tenants_key, *(self.keys(t)[0] for t in tenants)))}
            for node in nodes.values():
                pipe.execute_command("WAIT", c.wait_replicas, c.wait_ms, target_nodes=node)
        elif c.wait_replicas:
            pipe.execute_command("WAIT", c.wait_replicas, c.wait_ms)
        results = await pipe.execute(raise_on_error=False)
        return results[:writes], results[writes:]

    async def read(self, cursors: dict[str, str], count: int, block_ms: int) -> LogRead:
        if not cursors:
            if block_ms:
                await asyncio.sleep(block_ms / 1000.0)
            return LogRead((), {})
        try:
            if self.cluster:
                return await self._read_each(cursors, count, block_ms)
            streams = {self.keys(tenant)[0]: cursor for tenant, cursor in cursors.items()}
            reply = await self._reader.xread(streams, count=count, block=block_ms or None)
        except STORE_ERRORS as e:
            await forget_slots(self._reader)
            raise LogUnavailable(f"redis read must succeed, got {type(e).__name__}: {e}") from None
        entries, advanced = [], dict(cursors)
        for key, items in reply or ():
            tenant = self._tenant_of[key if isinstance(key, bytes) else key.encode()]
            entries += self._entries(tenant, items, advanced)
        return LogRead(tuple(entries), advanced)

    def _entries(self, tenant: str, items: list, advanced: dict[str, str]) -> list[LogEntry]:
        """LogEntry of each XREAD item of `tenant`, advancing its cursor in `advanced`."""
        entries = []
        for entry_id, fields in items:
            advanced[tenant] = entry_id.decode()
            if fields and b"t" in fields:
                entries.append(LogEntry(tenant, advanced[tenant], fields.get(b"o", b"").decode(),
                                        decode_tokens(fields[b"t"])))
        return entries

    async def _read_each(self, cursors: dict[str, str], count: int, block_ms: int) -> LogRead:
        """Cluster: one XRANGE per due tenant (`ClusterTail`: noted, new or advanced; all at a sweep),
        pipelined, polled every CLUSTER_POLL_S for `block_ms`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000.0
        while True:
            tenants = await self._tail.due(cursors)
            replies: list = []
            if tenants:
                pipe = self._reader.pipeline(transaction=False)
                for tenant in tenants:  # XRANGE, not XREAD: redis-py asks the server for XREAD's (movable) keys
                    cursor = cursors[tenant]
                    pipe.xrange(self.keys(tenant)[0], "-" if cursor == START else f"({cursor}", "+", count=count)
                replies = await pipe.execute(raise_on_error=True)
            entries, advanced = [], dict(cursors)
            for tenant, items in zip(tenants, replies):
                entries += self._entries(tenant, items or (), advanced)
            self._tail.advanced(cursors, advanced)
            if entries or loop.time() >= deadline:
                return LogRead(tuple(entries), advanced)
            await asyncio.sleep(min(CLUSTER_POLL_S, max(0.0, deadline - loop.time())))

    async def tenants(self) -> list[str]:
        """Every tenant with a log (SCARD first: the member list is fetched only when it grew)."""
        try:
            count = await self._writer.scard(self._tenants_key)
            if count != len(self._known):
                self._known = sorted(m.decode() for m in await self._writer.smembers(self._tenants_key))
        except STORE_ERRORS as e:
            await forget_slots(self._writer)
            raise LogUnavailable(f"redis tenants must be readable, got {type(e).__name__}: {e}") from None
        return list(self._known)

    async def size(self) -> LogSize:
        tenants = await self.tenants()
        try:
            pipe = self._writer.pipeline(transaction=False)
            for tenant in tenants:
                stream, tokens, _ = self.keys(tenant)
                pipe.xlen(stream)
                pipe.get(tokens)
            values = await pipe.execute() if tenants else []
        except STORE_ERRORS as e:
            raise LogUnavailable(f"redis size must be readable, got {type(e).__name__}: {e}") from None
        return LogSize(len(tenants), sum(int(v) for v in values[0::2]), sum(int(v or 0) for v in values[1::2]))

    async def close(self) -> None:
        for client in (self._writer, self._reader):
            try:
                await client.aclose()
            except (RedisError, RedisClusterException, OSError):
                pass
