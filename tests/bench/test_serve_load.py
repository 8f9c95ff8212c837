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


def test_hf_out_of_memory_fails_its_level_and_the_sweep_goes_on(monkeypatch):
    """transformers runs out of memory at long prompts and many streams: that level's requests fail with
    the error (a run the report keeps, so --resume does not retry it), the next level still runs."""
    import math
    from types import SimpleNamespace

    import torch

    from bench import hf_reference, serve

    def generate(model, prompts, lens, batch, pad):
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 68.00 GiB\nmore detail")
        return [RequestRecord(len(p), n, chunk_times=[0.01 * (i + 1) for i in range(n)], chunk_tokens=[1] * n,
                              output_tokens=n, latency=0.01 * n) for p, n in zip(prompts, lens)], 0.05

    monkeypatch.setattr(hf_reference, "load_hf_model",
                        lambda *a: SimpleNamespace(generation_config=SimpleNamespace(pad_token_id=0)))
    monkeypatch.setattr(hf_reference, "generate_records", generate)
    wl = Workload.parse("random:16:4", 4096)
    plan = [{"workload": wl, "level": Level(c, None), "items": wl.requests(max(8, c), np.random.default_rng(c), 4096),
             "runs": {}} for c in (4, 1)]
    args = SimpleNamespace(hf_batches=1, hf_max_batch=0, deadline=math.inf, save_report=None)
    serve.run_hf(args, SimpleNamespace(model_path="unused", device="cpu", dtype="float32"), plan)
    failed, _, decoded = plan[0]["runs"]["hf"]
    assert len(failed) == 4 and decoded is None
    assert all(r.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 68.00 GiB" for r in failed)
    summary = summarize(failed, plan[0]["runs"]["hf"][1], {})
    assert summary["completed"] == 0 and summary["failed"] == 4 and summary["output_throughput"] == 0
    ran, _, _ = plan[1]["runs"]["hf"]
    assert len(ran) == 1 and ran[0].ok


def test_hf_max_batch_leaves_larger_levels_out_and_missing(monkeypatch):
    """--hf-max-batch: transformers runs the levels up to that static batch; the others are not
    generated at all, are noted as skipped, and stay in the missing list for a later part."""
    import math
    from types import SimpleNamespace

    from bench import hf_reference, serve
    from bench.serve_resume import missing

    batches = []

    def generate(model, prompts, lens, batch, pad):
        batches.append(batch)
        return [RequestRecord(len(p), n, chunk_times=[0.01], chunk_tokens=[1], output_tokens=1, latency=0.01)
                for p, n in zip(prompts, lens)], 0.05

    monkeypatch.setattr(hf_reference, "load_hf_model",
                        lambda *a: SimpleNamespace(generation_config=SimpleNamespace(pad_token_id=0)))
    monkeypatch.setattr(hf_reference, "generate_records", generate)
    wl = Workload.parse("random:16:1", 4096)
    plan = [{"workload": wl, "level": Level(c, None), "items": wl.requests(max(8, c), np.random.default_rng(c), 4096),
             "runs": {}} for c in (1, 16, 4)]
    args = SimpleNamespace(hf_batches=1, hf_max_batch=4, deadline=math.inf, save_report=None)
    serve.run_hf(args, SimpleNamespace(model_path="unused", device="cpu", dtype="float32"), plan)
    assert batches == [2, 1, 4]  # the warm-up's batch of 2, then c=1 and c=4
    assert "hf" not in plan[1]["runs"] and plan[1]["skipped"] == ["hf"]
    assert missing(plan, ["hf"]) == ["random-16-1 c=16 hf"]


def test_missing_lists_the_runs_no_part_ran():
    from bench.serve_resume import missing

    wl = Workload.parse("random:16:4", 4096)
    plan = [{"workload": wl, "level": Level(1, None), "runs": {"mesh": ()}, "prior": {"engine": {}}},
            {"workload": wl, "level": Level(4, None), "runs": {}},
            {"workload": wl, "level": Level(None, 2.0), "runs": {"mesh": ()}}]
    assert missing(plan, ["mesh", "engine", "hf"]) == [
        "random-16-4 c=1 hf", "random-16-4 c=4 mesh", "random-16-4 c=4 engine", "random-16-4 c=4 hf",
        "random-16-4 rate=2/s engine"]  # transformers takes no request-rate level
