"""The prefix-cache index in Redis: which workers hold which KV blocks.

Keys (all under `rose:`), shared by every scheduler replica and surviving a
scheduler restart:
  rose:kv:{block_hash}     SET of worker ids holding that block
  rose:kvw:{worker_id}     SET of block hashes the worker holds (for cleanup)
  rose:kv:workers          SET of worker ids that have entries
  rose:worker:{worker_id}  HASH of the worker's last heartbeat counters; expires
                           when heartbeats stop, which marks the worker's
                           entries as stale for any replica's sweep

Redis being down never stops routing: every call returns an empty answer while the
connection is down, a background task reconnects with backoff, and `on_reconnect`
is called so the scheduler can ask its workers to resend their whole cache
(Redis may have restarted empty).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PREFIX = "rose:"
BLOCK_KEY = PREFIX + "kv:"
WORKER_BLOCKS_KEY = PREFIX + "kvw:"
INDEXED_WORKERS_KEY = PREFIX + "kv:workers"
WORKER_STATS_KEY = PREFIX + "worker:"

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0

# Walk the chain from the first block and stop at the first block no surviving
# worker holds: one round trip, and work proportional to the hit, not the prompt.
# ARGV: block key prefix, then the prompt's chained hashes in order.
# Returns a flat list: worker, depth, worker, depth, ...
_LONGEST_PREFIX_LUA = """
local alive = nil
local depth = {}
for i = 2, #ARGV do
  local members = redis.call('SMEMBERS', ARGV[1] .. ARGV[i])
  local next_alive = {}
  local any = false
  for _, w in ipairs(members) do
    if alive == nil or alive[w] then
      next_alive[w] = true
      depth[w] = i - 1
      any = true
    end
  end
  if not any then break end
  alive = next_alive
end
local out = {}
for w, d in pairs(depth) do
  table.insert(out, w)
  table.insert(out, d)
end
return out
"""

# Remove every entry of one worker atomically. KEYS: worker's set, indexed-workers set.
# ARGV: worker id, block key prefix.
_CLEAR_WORKER_LUA = """
local hashes = redis.call('SMEMBERS', KEYS[1])
for _, h in ipairs(hashes) do
  redis.call('SREM', ARGV[2] .. h, ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return #hashes
"""


class PrefixIndex:
    """Async client of the Redis prefix index; never raises on a Redis outage."""

    def __init__(self, url: str, on_reconnect: Callable[[], Awaitable[None]] | None = None, timeout: float = 0.5):
        # No client-side retries: a failed call marks Redis down at once and routing
        # goes on least-loaded, instead of stalling every request on retries.
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self.url = url
        self.on_reconnect = on_reconnect
        self.available = True
        self._reconnecting: asyncio.Task | None = None
        self._longest_prefix = self.redis.register_script(_LONGEST_PREFIX_LUA)
        self._clear_worker = self.redis.register_script(_CLEAR_WORKER_LUA)

    async def close(self) -> None:
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        await self.redis.aclose()

    # ------------------------------------------------------------ queries
    async def longest_prefix(self, hashes: list[int]) -> dict[str, int]:
        """Worker id -> how many leading blocks of `hashes` it holds (only workers with > 0)."""
        if not hashes or not self.available:
            return {}
        try:
            flat = await self._longest_prefix(args=[BLOCK_KEY, *hashes])
        except RedisError as exc:
            self._lost(exc)
            return {}
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def workers_holding(self, block_hash: int) -> set[str]:
        if not self.available:
            return set()
        try:
            return set(await self.redis.smembers(f"{BLOCK_KEY}{block_hash}"))
        except RedisError as exc:
            self._lost(exc)
            return set()

    async def blocks_of(self, worker_id: str) -> set[int]:
        if not self.available:
            return set()
        try:
            return {int(h) for h in await self.redis.smembers(f"{WORKER_BLOCKS_KEY}{worker_id}")}
        except RedisError as exc:
            self._lost(exc)
            return set()

    # ------------------------------------------------------------ updates
    async def apply(self, worker_id: str, stored: list[int], removed: list[int], cleared: bool = False) -> bool:
        """Apply one KvEvent: clear first (a full resend follows a clear), then removals, then stores."""
        if not self.available:
            return False
        try:
            if cleared:
                await self._clear_worker(keys=[f"{WORKER_BLOCKS_KEY}{worker_id}", INDEXED_WORKERS_KEY], args=[worker_id, BLOCK_KEY])
            if not (stored or removed):
                return True
            pipe = self.redis.pipeline(transaction=False)
            for h in removed:
                pipe.srem(f"{BLOCK_KEY}{h}", worker_id)
            if removed:
                pipe.srem(f"{WORKER_BLOCKS_KEY}{worker_id}", *removed)
            for h in stored:
                pipe.sadd(f"{BLOCK_KEY}{h}", worker_id)
            if stored:
                pipe.sadd(f"{WORKER_BLOCKS_KEY}{worker_id}", *stored)
                pipe.sadd(INDEXED_WORKERS_KEY, worker_id)
            await pipe.execute()
            return True
        except RedisError as exc:
            self._lost(exc)
            return False

    async def clear(self, worker_id: str) -> bool:
        """Drop every entry of a worker (dead, restarted, or re-registering)."""
        return await self.apply(worker_id, [], [], cleared=True)

    async def publish_stats(self, worker_id: str, stats: dict[str, int | float | str], ttl_s: float) -> None:
        """The worker's heartbeat counters, expiring ttl_s after the last heartbeat."""
        if not self.available:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(f"{WORKER_STATS_KEY}{worker_id}", mapping=stats)
            pipe.pexpire(f"{WORKER_STATS_KEY}{worker_id}", max(1, int(ttl_s * 1000)))
            await pipe.execute()
        except RedisError as exc:
            self._lost(exc)

    async def worker_stats(self, worker_id: str) -> dict[str, str]:
        if not self.available:
            return {}
        try:
            return await self.redis.hgetall(f"{WORKER_STATS_KEY}{worker_id}")
        except RedisError as exc:
            self._lost(exc)
            return {}

    async def sweep_stale(self, live: set[str]) -> list[str]:
        """Clear workers that have entries but no live stats key and are not live here.

        Catches what a crashed scheduler (or replica) left behind; returns the ids cleared.
        """
        if not self.available:
            return []
        try:
            indexed = await self.redis.smembers(INDEXED_WORKERS_KEY)
            stale = []
            for worker_id in indexed:
                if worker_id not in live and not await self.redis.exists(f"{WORKER_STATS_KEY}{worker_id}"):
                    stale.append(worker_id)
        except RedisError as exc:
            self._lost(exc)
            return []
        for worker_id in stale:
            await self.clear(worker_id)
        return stale

    # ------------------------------------------------------------ outages
    def _lost(self, exc: Exception) -> None:
        if self.available:
            log.warning("redis at %s unreachable (%s); routing least-loaded until it is back", self.url, exc)
        self.available = False
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = BACKOFF_START_S
        while True:
            await asyncio.sleep(delay)
            try:
                # Pooled connections from before the outage are dead (a restarted
                # server closed them): drop them, or the first commands after the
                # reconnect fail on them and the index is lost again.
                await self.redis.connection_pool.disconnect()
                await self.redis.ping()
            except RedisError:
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            log.warning("redis at %s is back; rebuilding the prefix index", self.url)
            self.available = True
            if self.on_reconnect is not None:
                try:
                    await self.on_reconnect()
                except Exception:
                    log.exception("rebuilding the prefix index after a reconnect failed")
            return
