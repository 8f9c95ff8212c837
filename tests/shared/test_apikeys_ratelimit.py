import asyncio

import pytest
import redis.asyncio as aioredis

from shared.apikeys import ApiKeyError, KeyRing, hash_key, parse_key_line
from shared.config import Settings
from shared.ratelimit import RateLimiter


def test_keyring_accepts_raw_and_hashed_keys(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# team keys\nsha256:{hash_key('sk-hashed')} name=team rpm=5\n\n")
    ring = KeyRing.from_settings(Settings(api_keys="sk-raw", api_keys_file=str(keyfile)))
    assert ring.enabled
    assert ring.check("sk-hashed").name == "team" and ring.check("sk-hashed").rpm == 5
    assert ring.check("sk-raw") is not None
    assert ring.check("sk-wrong") is None and ring.check("") is None and ring.check(None) is None


def test_keyring_is_off_without_keys():
    assert not KeyRing.from_settings(Settings()).enabled


@pytest.mark.parametrize("line", ["sha256:abc", "key colour=red", "key rpm=many"])
def test_bad_key_lines_are_clear_errors(line):
    with pytest.raises(ApiKeyError, match="f:1"):
        parse_key_line(line, "f:1")


def test_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(ApiKeyError, match="ROSE_API_KEYS_FILE"):
        KeyRing.from_settings(Settings(api_keys_file=str(tmp_path / "absent")))


async def test_request_budget_is_shared_across_limiters(redis_url):
    client_a, client_b = aioredis.from_url(redis_url), aioredis.from_url(redis_url)
    a = RateLimiter(client_a, rpm=3, tpm=0, prefix="t1")
    b = RateLimiter(client_b, rpm=3, tpm=0, prefix="t1")  # a second gateway replica
    results = [await (a if i % 2 else b).admit("k") for i in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert results[-1].limit == "requests" and 1 <= results[-1].retry_after <= 20
    assert (await a.admit("other-key")).allowed
    await client_a.aclose(), await client_b.aclose()


async def test_token_budget_refuses_after_use_and_refills(redis_url):
    client = aioredis.from_url(redis_url)
    limiter = RateLimiter(client, rpm=0, tpm=6000, prefix="t2")  # 100 tokens/s refill
    assert (await limiter.admit("k")).allowed
    await limiter.charge_tokens("k", 6050)
    refused = await limiter.admit("k")
    assert not refused.allowed and refused.limit == "tokens"
    await asyncio.sleep(0.8)
    assert (await limiter.admit("k")).allowed
    await client.aclose()


async def test_limiter_fails_open_without_redis():
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    limiter = RateLimiter(client, rpm=1, tpm=1)
    assert (await limiter.admit("k")).allowed
    await limiter.charge_tokens("k", 10)
    await client.aclose()
