"""bench/serve.py's load generator and workloads, without a mesh."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.serve import ORDINARY_TOKENS, Level, Workload, drive, summarize
from bench.streaming import RequestRecord


def test_random_workload_is_token_exact_and_seeded():
    wl = Workload.parse("random:100:7", 4096)
    a = wl.requests(5, np.random.default_rng(3), 4096)
    b = wl.requests(5, np.random.default_rng(3), 4096)
    assert a == b
    assert all(len(p) == 100 and n == 7 and all(0 <= t < ORDINARY_TOKENS for t in p) for p, n in a)
    assert len({tuple(p) for p, _ in a}) == 5  # no two prompts share a prefix block


def test_shared_prefix_workload_opens_every_prompt_alike():
    wl = Workload.parse("random:100:7:64", 4096)
    assert wl.name == "random-100-7-shared64"
    items = wl.requests(4, np.random.default_rng(3), 4096)
    assert all(len(p) == 100 and n == 7 for p, n in items)
    assert len({tuple(p[:64]) for p, _ in items}) == 1 and len({tuple(p[64:]) for p, _ in items}) == 4
    # a repeat pass's prompts (same lengths, another generator): its own shared prefix, still one for all
    again = wl.prompts([(len(p), n) for p, n in items], np.random.default_rng(4))
    assert len({tuple(p[:64]) for p, _ in again}) == 1 and again[0][0][:64] != items[0][0][:64]
    with pytest.raises(ValueError):
        Workload.parse("random:100:7:100", 4096)


def test_sharegpt_lengths_vary_within_caps():
    wl = Workload.parse("sharegpt:300:50", 4096)
    items = wl.requests(400, np.random.default_rng(0), 4096)
    ins, outs = [len(p) for p, _ in items], [n for _, n in items]
    assert 4 <= min(ins) and max(ins) == 300 and 4 <= min(outs) and max(outs) == 50
    assert 120 < np.median(ins) < 260  # lognormal, median 180 before clipping
    with pytest.raises(ValueError):
        Workload.parse("sharegpt:1", 4096)


def test_concurrency_caps_requests_in_flight():
    in_flight, most = 0, 0

    async def send(i, prompt, max_tokens):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return RequestRecord(len(prompt), max_tokens, chunk_times=[0.001, 0.002], chunk_tokens=[1, 1], output_tokens=2,
                             latency=0.01, finish_reason="length")

    records, duration = asyncio.run(drive(send, [([1, 2], 2)] * 12, Level(3, None), 0))
    assert len(records) == 12 and most == 3 and duration >= 4 * 0.01
    summary = summarize(records, duration, {"ttft": 1.5})
    assert summary["completed"] == 12 and summary["goodput"] == pytest.approx(12 / duration)
    assert summary["finish_reasons"] == {"length": 12}
    assert summarize(records, duration, {"ttft": 0.5})["goodput"] == 0  # TTFT 1 ms misses a 0.5 ms SLO


def test_request_rate_spaces_arrivals():
    sent = []

    async def send(i, prompt, max_tokens):
        sent.append(asyncio.get_running_loop().time())
        return RequestRecord(len(prompt), max_tokens, error="not sent")

    records, duration = asyncio.run(drive(send, [([1], 1)] * 40, Level(None, 100.0), 7))
    gaps = np.diff(sent)
    assert len(records) == 40 and 0.5 / 100 < gaps.mean() < 2 / 100  # Poisson: mean gap 1/rate
    assert summarize(records, duration, {})["failed"] == 40
