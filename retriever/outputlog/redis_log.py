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

Timeouts are short and redis-py's own retries are off: a failure raises `LogUnavailable`
at once; the caller (`PublishQueue`, `LogSync`) backs off and retries. Blocking reads use
their own connection pool, so a pending XREAD never delays an append.
"""

from __future__ import annotations

import asyncio
from typing import Sequence
from urllib.parse import quote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from retriever.outputlog.contract import (
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


class RedisLog:
    """The `OutputLog` contract over Redis; connections open lazily (construction never fails
    on an unreachable server). `config.redis_url` must be set."""

    name = "redis"

    def __init__(self, config: LogConfig, prefix: str = "specdraft") -> None:
        if not config.redis_url:
            raise ValueError("LogConfig.redis_url must be a redis://, rediss:// or unix:// URL, got ''")
        self._config, self._prefix = config, prefix
        self._tenants_key = f"{prefix}:tenants"
        self._writer = self._client(config.timeout_s)
        self._reader = self._client(config.timeout_s + config.block_ms / 1000.0)
        self._known: list[str] = []
        self._keys: dict[str, tuple[str, str, str]] = {}
        self._tenant_of: dict[bytes, str] = {}

    def _client(self, socket_timeout_s: float) -> aioredis.Redis:
        c = self._config
        auth = {k: v for k, v in (("username", c.redis_username), ("password", c.redis_password)) if v}
        try:
            return aioredis.Redis.from_url(c.redis_url, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=c.timeout_s, retry=Retry(NoBackoff(), 0), protocol=2,
                                           health_check_interval=0, **auth)
        except ValueError as e:
            raise ValueError(f"SPECDRAFT_REDIS_URL must be a redis://, rediss:// or unix:// URL, "
                             f"got {redact(c.redis_url)!r} ({e})") from None

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
            results = await self._append_pipeline(batch)
            if any(isinstance(r, NoScriptError) for r in results):  # a restarted or flushed server
                await self._writer.script_load(APPEND_LUA)
                results = await self._append_pipeline(batch)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise LogUnavailable(f"redis append must succeed, got {type(e).__name__}: {e}") from None
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise LogUnavailable(f"redis append must succeed, got {type(failed).__name__}: {failed}")
        if self._config.wait_replicas:
            await self._wait_replicas()

    async def _wait_replicas(self) -> None:
        """WAIT for `wait_replicas` replicas to hold the append; LogUnavailable when fewer do in `wait_ms`."""
        c = self._config
        try:
            acked = await self._writer.execute_command("WAIT", c.wait_replicas, c.wait_ms)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise LogUnavailable(f"redis WAIT must succeed, got {type(e).__name__}: {e}") from None
        if int(acked) < c.wait_replicas:
            raise LogUnavailable(f"redis append must reach {c.wait_replicas} replicas within {c.wait_ms} ms, "
                                 f"got {acked}")

    async def _append_pipeline(self, batch: Sequence[PendingOutput]) -> list[object]:
        c = self._config
        pipe = self._writer.pipeline(transaction=False)
        for tenant in dict.fromkeys(item.tenant for item in batch):
            pipe.sadd(self._tenants_key, tenant)
        for item in batch:
            pipe.evalsha(APPEND_SHA, 3, *self.keys(item.tenant), item.origin, item.seq, item.payload,
                         c.token_budget, c.dedup_ttl_s * 1000)
        return await pipe.execute(raise_on_error=False)

    async def read(self, cursors: dict[str, str], count: int, block_ms: int) -> LogRead:
        if not cursors:
            if block_ms:
                await asyncio.sleep(block_ms / 1000.0)
            return LogRead((), {})
        streams = {self.keys(tenant)[0]: cursor for tenant, cursor in cursors.items()}
        try:
            reply = await self._reader.xread(streams, count=count, block=block_ms or None)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise LogUnavailable(f"redis read must succeed, got {type(e).__name__}: {e}") from None
        entries, advanced = [], dict(cursors)
        for key, items in reply or ():
            tenant = self._tenant_of[key if isinstance(key, bytes) else key.encode()]
            for entry_id, fields in items:
                advanced[tenant] = entry_id.decode()
                if fields and b"t" in fields:
                    entries.append(LogEntry(tenant, advanced[tenant], fields.get(b"o", b"").decode(),
                                            decode_tokens(fields[b"t"])))
        return LogRead(tuple(entries), advanced)

    async def tenants(self) -> list[str]:
        """Every tenant with a log (SCARD first: the member list is fetched only when it grew)."""
        try:
            count = await self._writer.scard(self._tenants_key)
            if count != len(self._known):
                self._known = sorted(m.decode() for m in await self._writer.smembers(self._tenants_key))
        except (RedisError, OSError, asyncio.TimeoutError) as e:
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
            values = await pipe.execute()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            raise LogUnavailable(f"redis size must be readable, got {type(e).__name__}: {e}") from None
        return LogSize(len(tenants), sum(int(v) for v in values[0::2]), sum(int(v or 0) for v in values[1::2]))

    async def close(self) -> None:
        for client in (self._writer, self._reader):
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass
