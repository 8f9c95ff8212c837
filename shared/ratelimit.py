"""Per-key rate limits kept in Redis, so they hold across gateway replicas.

Two token buckets per key, refilled continuously from Redis' own clock (one clock
for every replica): requests per minute (one token per request, taken on
admission) and tokens per minute (debited with the tokens a request really used
once it ends; a key whose bucket is empty or in debt is refused until it refills).
If Redis cannot be reached the limiter lets requests through and logs it: an
outage of the limiter's store should not take the API down with it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV capacity, refill per second, cost, mode (take|debit|peek).
# take: remove cost if available; debit: remove cost unconditionally (may go negative);
# peek: allowed while the bucket is above zero. Returns {allowed, level, retry_after_s}.
_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local mode = ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(data[1]) or capacity
local ts = tonumber(data[2]) or now
level = math.min(capacity, level + math.max(0, now - ts) * rate)
local allowed = 0
local retry = 0
if mode == 'debit' then
  level = level - cost
  allowed = 1
elseif mode == 'peek' then
  if level > 0 then allowed = 1 else retry = (1 - level) / rate end
elseif level >= cost then
  level = level - cost
  allowed = 1
else
  retry = (cost - level) / rate
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - math.min(level, 0)) / rate * 1000) + 1000)
return {allowed, tostring(level), tostring(retry)}
"""


@dataclass
class Admission:
    allowed: bool
    retry_after: float = 0.0  # seconds until a retry can succeed
    limit: str = ""  # "requests" or "tokens" when refused


class RateLimiter:
    """Requests/min and tokens/min per key name; a limit of 0 is off."""

    def __init__(self, redis, rpm: int, tpm: int, prefix: str = "rose:ratelimit"):
        self._redis = redis
        self.rpm, self.tpm = rpm, tpm
        self._prefix = prefix
        self._script = redis.register_script(_BUCKET_LUA)

    async def _bucket(self, key: str, kind: str, per_minute: int, cost: float, mode: str) -> tuple[bool, float]:
        allowed, _level, retry = await self._script(
            keys=[f"{self._prefix}:{kind}:{key}"], args=[per_minute, per_minute / 60.0, cost, mode]
        )
        return bool(int(allowed)), float(retry)

    async def admit(self, key: str, rpm: int | None = None, tpm: int | None = None) -> Admission:
        """Take one request from the key's budget; rpm/tpm override the global limits."""
        rpm = self.rpm if rpm is None else rpm
        tpm = self.tpm if tpm is None else tpm
        try:
            if tpm > 0:
                ok, retry = await self._bucket(key, "tokens", tpm, 0, "peek")
                if not ok:
                    return Admission(False, math.ceil(retry), "tokens")
            if rpm > 0:
                ok, retry = await self._bucket(key, "requests", rpm, 1, "take")
                if not ok:
                    return Admission(False, math.ceil(retry), "requests")
        except Exception as exc:  # redis errors of every kind: fail open
            log.warning("rate limiter unavailable, admitting: %s", exc)
        return Admission(True)

    async def charge_tokens(self, key: str, tokens: int, tpm: int | None = None) -> None:
        """Debit the tokens a finished request used."""
        tpm = self.tpm if tpm is None else tpm
        if tpm <= 0 or tokens <= 0:
            return
        try:
            await self._bucket(key, "tokens", tpm, tokens, "debit")
        except Exception as exc:
            log.warning("rate limiter unavailable, not charged: %s", exc)
