"""Request lifecycle: stop conditions, penalties, abort, failures, preemption, limits, bad input, KV events."""

from __future__ import annotations

import json
import math

import pytest
import torch
from engine_helpers import VOCAB, assert_all_blocks_free, generate_contiguous, greedy, prompt, run_all

from services.worker.engine import Engine, EngineInputError
from shared.block_hash import prefix_hashes
from shared.config import Settings
from shared.protocol import SamplingParams


@pytest.fixture(scope="module")
def ref70(small_model):
    """Greedy answer to prompt(70): it repeats token 151, which the penalty tests rely on."""
    tokens = generate_contiguous(small_model, prompt(70, seed=70), greedy(12)).token_ids
    assert len(set(tokens)) < len(tokens)
    return tokens


def test_stop_token_ends_the_request_and_is_returned(make_engine, ref70):
    stop = ref70[4]
    engine = make_engine()
    engine.add_request("s", prompt(70, seed=70), greedy(12, stop_token_ids=[stop]))
    result = run_all(engine)["s"]
    end = ref70.index(stop) + 1
    assert result.token_ids == ref70[:end]
    assert result.last.finish_reason == "stop"


def test_eos_stops_unless_ignored(make_engine, ref70):
    eos = ref70[2]
    engine = make_engine(eos_token_ids=[eos])
    engine.add_request("eos", prompt(70, seed=70), greedy(12))
    engine.add_request("ignore", prompt(70, seed=70), greedy(12, ignore_eos=True))
    results = run_all(engine)
    assert results["eos"].token_ids == ref70[:3] and results["eos"].last.finish_reason == "stop"
    assert results["ignore"].token_ids == ref70 and results["ignore"].last.finish_reason == "length"


def test_penalties_change_the_greedy_path(make_engine, ref70):
    tokens = prompt(70, seed=70)
    engine = make_engine()
    engine.add_request("rep", tokens, greedy(12, repetition_penalty=1e9))
    engine.add_request("freq", tokens, greedy(12, frequency_penalty=2.0))
    engine.add_request("neutral", tokens, greedy(12, frequency_penalty=0.0, presence_penalty=0.0))
    results = run_all(engine)
    rep = results["rep"].token_ids
    # Seen tokens (prompt or output) are pushed to the bottom: no repeats, nothing from the prompt.
    assert len(set(rep)) == len(rep) and not set(rep) & set(tokens)
    first_repeat = next(i for i, t in enumerate(ref70) if t in ref70[:i])
    freq = results["freq"].token_ids
    assert freq[:first_repeat] == ref70[:first_repeat]  # nothing generated twice yet: no change
    assert freq != ref70
    assert results["neutral"].token_ids == ref70


def test_abort_frees_blocks_now_and_others_continue(make_engine, small_model):
    engine = make_engine()
    prompts = {name: prompt(n, seed=n) for name, n in (("a", 23), ("b", 41), ("c", 5))}
    for name, tokens in prompts.items():
        engine.add_request(name, tokens, greedy(12))
    results = {}
    for _ in range(4):
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    held_before = {g: engine.stats().total_blocks[g] - engine.stats().free_blocks[g] for g in engine.blocks.pools}
    assert engine.abort("b")
    assert not engine.abort("b") and not engine.abort("nobody")
    stats = engine.stats()
    assert all(stats.total_blocks[g] - stats.free_blocks[g] < held_before[g] for g in engine.blocks.pools)
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "b"]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].token_ids == []
    for out in outs:
        results.setdefault(out.request_id, []).append(out)
    while engine.has_work():
        for out in engine.step():
            assert out.request_id != "b"
            results.setdefault(out.request_id, []).append(out)
    for name in ("a", "c"):
        tokens = [t for o in results[name] for t in o.token_ids]
        assert tokens == generate_contiguous(small_model, prompts[name], greedy(12)).token_ids


def test_abort_of_a_waiting_request(make_engine):
    engine = make_engine(max_num_seqs=1)
    engine.add_request("running", prompt(10, seed=1), greedy(4))
    engine.add_request("queued", prompt(10, seed=2), greedy(4))
    engine.step()
    assert engine.stats().num_waiting == 1
    assert engine.abort("queued")
    results = run_all(engine)
    assert results["queued"].last.finish_reason == "abort" and results["queued"].last.cached_tokens == 0
    assert results["running"].last.finish_reason == "length"


def test_forward_error_fails_the_batch_and_the_engine_recovers(make_engine, small_model):
    engine = make_engine()
    engine.add_request("x", prompt(23, seed=23), greedy(8))
    engine.add_request("y", prompt(5, seed=5), greedy(8))
    engine.step()
    good_k = engine.kv.k[0]
    engine.kv.k[0] = torch.empty(0)  # a broken cache: the real forward pass raises
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["x", "y"]
    assert all(o.finish_reason == "error" and "forward pass failed" in o.error for o in outs)
    assert_all_blocks_free(engine)
    engine.kv.k[0] = good_k
    engine.add_request("after", prompt(41, seed=41), greedy(8))
    assert run_all(engine)["after"].token_ids == generate_contiguous(small_model, prompt(41, seed=41), greedy(8)).token_ids


def test_non_finite_logits_fail_only_that_request(make_engine, small_model):
    engine = make_engine()
    engine.add_request("poisoned", prompt(23, seed=23), greedy(8))
    engine.add_request("healthy", prompt(41, seed=41), greedy(8))
    results = {}
    for out in engine.step():  # both prefilled in one step
        results.setdefault(out.request_id, []).append(out)
    seq = engine.requests["poisoned"]
    for layer, group in enumerate(engine.kv.layer_groups):
        blocks = [b for b in seq.blocks.tables[group] if b >= 0]
        engine.kv.v[layer][blocks] = float("nan")
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
    assert results["poisoned"][-1].finish_reason == "error"
    assert "non-finite" in results["poisoned"][-1].error
    healthy = [t for o in results["healthy"] for t in o.token_ids]
    assert healthy == generate_contiguous(small_model, prompt(41, seed=41), greedy(8)).token_ids
    # The failed request's blocks left the prefix cache: the same prompt is computed afresh.
    engine.add_request("again", prompt(23, seed=23), greedy(8))
    again = run_all(engine)["again"]
    assert again.last.cached_tokens == 0
    assert again.token_ids == generate_contiguous(small_model, prompt(23, seed=23), greedy(8)).token_ids


def test_non_finite_logits_fail_only_that_request_when_sampling_on_the_host(make_engine, small_model):
    # logprobs make the sampler run on the host; a NaN row must not fail its batch mates there either
    engine = make_engine()
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=2)
    engine.add_request("poisoned", prompt(23, seed=23), params)
    engine.add_request("healthy", prompt(41, seed=41), params)
    results = {}
    for out in engine.step():
        results.setdefault(out.request_id, []).append(out)
    seq = engine.requests["poisoned"]
    for layer, group in enumerate(engine.kv.layer_groups):
        engine.kv.v[layer][[b for b in seq.blocks.tables[group] if b >= 0]] = float("nan")
    for out in run_all(engine).values():
        results.setdefault(out.last.request_id, []).extend(out.outputs)
    assert results["poisoned"][-1].finish_reason == "error" and "non-finite" in results["poisoned"][-1].error
    healthy = [t for o in results["healthy"] for t in o.token_ids]
    assert results["healthy"][-1].finish_reason == "length" and len(healthy) == 8


def test_out_of_blocks_requests_wait_or_are_preempted_and_all_finish(make_engine, small_model):
    # 12 blocks of 4 tokens per group; each request grows to 36 tokens (9 blocks).
    engine = make_engine(num_blocks=12, max_num_batched_tokens=32)
    prompts = {f"r{i}": prompt(20, seed=100 + i) for i in range(4)}
    for name, tokens in prompts.items():
        engine.add_request(name, tokens, greedy(16))
    results = {}
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
        stats = engine.stats()
        assert all(stats.free_blocks[g] >= 0 for g in stats.free_blocks)
    assert engine.stats().num_preemptions > 0
    for name, tokens in prompts.items():
        assert results[name][-1].finish_reason == "length"
        got = [t for o in results[name] for t in o.token_ids]
        assert got == generate_contiguous(small_model, tokens, greedy(16)).token_ids, name


def test_prefix_hit_shrinks_when_the_sliding_window_blocks_were_evicted(make_engine, small_model):
    # Plenty of full blocks, few sliding ones: the full group keeps the whole prefix while
    # other traffic evicts the sliding blocks its window needs.
    engine = make_engine(num_blocks={"full": 64, "sliding": 8})
    shared = prompt(37, seed=11)
    engine.add_request("a", shared + prompt(6, seed=12), greedy(4))
    run_all(engine)
    engine.add_request("churn", prompt(30, seed=13), greedy(2))
    run_all(engine)
    before = engine.stats().prefill_tokens_computed
    second = shared + prompt(9, seed=14)
    engine.add_request("b", second, greedy(8))
    result = run_all(engine)["b"]
    assert result.last.cached_tokens < (37 // 4) * 4
    assert engine.stats().prefill_tokens_computed - before == len(second) - result.last.cached_tokens
    assert result.token_ids == generate_contiguous(small_model, second, greedy(8)).token_ids


def test_limits_max_num_seqs_and_token_budget(make_engine):
    engine = make_engine(max_num_seqs=2, max_num_batched_tokens=10)
    for i in range(4):
        engine.add_request(f"r{i}", prompt(12, seed=i), greedy(5))
    while engine.has_work():
        before = engine.stats()
        engine.step()
        after = engine.stats()
        assert after.num_running <= 2
        computed = (after.prefill_tokens_computed + after.decode_tokens_computed
                    - before.prefill_tokens_computed - before.decode_tokens_computed)
        assert computed <= 10
    assert engine.stats().requests_finished == 4


def test_request_times_come_with_the_finishing_output(make_engine):
    """With room for one sequence the second request waits until the first ends; its times say so."""
    engine = make_engine(max_num_seqs=1, max_num_batched_tokens=16)
    engine.add_request("first", prompt(30, seed=1), greedy(3))
    engine.add_request("second", prompt(30, seed=2), greedy(3), arrived=engine.requests["first"].times.arrived - 1.0)
    results = run_all(engine)
    for result in results.values():
        assert all(out.times is None for out in result.outputs[:-1])
        t = result.last.times
        assert t.arrived <= t.scheduled <= t.first_token <= t.finished
        ms = t.latencies_ms()
        assert ms["ttft"] == pytest.approx(ms["queue"] + ms["prefill"])
        assert ms["e2e"] == pytest.approx(ms["ttft"] + ms["decode"])
    first, second = results["first"].last.times, results["second"].last.times
    assert second.scheduled >= first.finished  # one sequence at a time: it waited for the first to end
    assert second.latencies_ms()["queue"] >= 1000.0  # and its queue time counts from the arrival it was given


def test_step_log_counts_what_each_step_ran(make_engine, tmp_path, monkeypatch):
    """ROSE_STEP_LOG: one line a step; its prompt tokens, decode rows and starts add up to the engine's counters."""
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("ROSE_STEP_LOG", str(path))
    engine = make_engine(max_num_batched_tokens=16)
    for i in range(3):
        engine.add_request(f"r{i}", prompt(20, seed=i), greedy(5))
    run_all(engine)
    engine._step_log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    stats = engine.stats()
    assert len(lines) == stats.steps
    assert sum(s["prompt_tokens"] for s in lines) == stats.prefill_tokens_computed
    assert sum(s["decode"] for s in lines) == stats.decode_tokens_computed
    assert sum(s["new"] for s in lines) == 3
    assert [s["t"] for s in lines] == sorted(s["t"] for s in lines)
    assert max(s["waiting"] for s in lines) >= 1  # 60 prompt tokens through a 16-token budget


def test_sliding_group_holds_only_the_window(make_engine):
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("long", prompt(60, seed=60), greedy(40, ignore_eos=True))
    while engine.has_work():
        engine.step()
        if "long" not in engine.requests:
            continue
        seq = engine.requests["long"]
        stats = engine.stats()
        held_full = stats.total_blocks["full"] - stats.free_blocks["full"]
        held_sliding = stats.total_blocks["sliding"] - stats.free_blocks["sliding"]
        assert held_full == math.ceil(seq.num_computed / 4)  # the full group keeps every block
        # window 16 + one kept position + an 8-token chunk, in 4-token blocks
        assert held_sliding <= math.ceil((16 + 1 + 8) / 4) + 1


def test_kv_events_follow_the_prefix_cache(make_engine):
    engine = make_engine(num_blocks=12)
    tokens = prompt(20, seed=9)
    engine.add_request("a", tokens, greedy(6))
    generated = run_all(engine)["a"].token_ids
    stored, removed = engine.drain_kv_events()
    computed = (tokens + generated)[: len(tokens) + len(generated) - 1]
    assert stored == prefix_hashes(computed, 4) and removed == []
    assert engine.stats().cached_blocks["full"] == len(stored)
    # A different request needing every block evicts the whole cached prefix.
    engine.add_request("b", prompt(44, seed=10), greedy(4))
    run_all(engine)
    stored, removed = engine.drain_kv_events()
    assert set(prefix_hashes(computed, 4)) <= set(removed)
    assert engine.drain_kv_events() == ([], [])


@pytest.mark.parametrize(
    "request_id, tokens, params, message",
    [
        ("e", [], greedy(4), "empty"),
        ("v", [1, VOCAB, 2], greedy(4), r"token_ids\[1\]"),
        ("n", [1, -1], greedy(4), r"token_ids\[1\]"),
        ("t", "hello", greedy(4), "list of integers"),
        ("l", [1] * 100, greedy(40), "context of 128"),
        ("p", [1, 2], SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
        ("m", [1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ("", [1, 2], greedy(4), "request_id"),
    ],
)
def test_bad_input_is_refused_and_the_engine_keeps_serving(make_engine, small_model, request_id, tokens, params, message):
    engine = make_engine()
    engine.add_request("good", prompt(23, seed=23), greedy(8))
    result = run_all(engine, max_steps=1)  # mid-generation
    assert engine.has_work()
    with pytest.raises(EngineInputError, match=message):
        engine.add_request(request_id, tokens, params)
    with pytest.raises(EngineInputError, match="already running"):
        engine.add_request("good", [1, 2, 3], greedy(4))
    run_all(engine, result)
    assert list(result) == ["good"]
    assert result["good"].token_ids == generate_contiguous(small_model, prompt(23, seed=23), greedy(8)).token_ids


def test_request_larger_than_the_cache_is_refused(make_engine):
    engine = make_engine(num_blocks=8)
    with pytest.raises(EngineInputError, match="KV blocks"):
        engine.add_request("big", prompt(30, seed=1), greedy(10))  # 40 tokens = 10 blocks > 8
    engine.add_request("fits", prompt(20, seed=1), greedy(10))
    assert run_all(engine)["fits"].last.finish_reason == "length"


def test_from_settings_loads_the_tiny_checkpoint(tiny_checkpoint):
    settings = Settings(model=tiny_checkpoint, max_model_len=256, max_num_seqs=4, block_size=16,
                        max_num_batched_tokens=64)
    engine = Engine.from_settings(settings)
    stats = engine.stats()
    assert stats.max_model_len == 256 and stats.block_size == 16
    assert stats.total_blocks["full"] == 4 * 16  # max_num_seqs x blocks of max_model_len
    assert stats.total_blocks["sliding"] < stats.total_blocks["full"]  # window-sized
    assert 200002 in engine.eos_token_ids and 200012 in engine.eos_token_ids
    engine.add_request("hi", [200006, 17360, 200008, 12194, 200007], greedy(5, ignore_eos=True))
    result = run_all(engine)["hi"]
    assert len(result.token_ids) == 5 and all(0 <= t < 201088 for t in result.token_ids)
    assert_all_blocks_free(engine)
    with pytest.raises(EngineInputError, match="context of 256"):
        engine.add_request("long", [1] * 250, greedy(10))
    assert not engine.overlap  # auto: off on the CPU


@pytest.mark.parametrize("value, overlap", [("auto", False), ("on", True), ("off", False)])
def test_engine_overlap_setting(tiny_checkpoint, value, overlap):
    settings = Settings(model=tiny_checkpoint, max_model_len=64, max_num_seqs=2, engine_overlap=value)
    assert Engine.from_settings(settings).overlap is overlap


def test_bad_engine_overlap_setting_is_refused_before_loading(tiny_checkpoint):
    with pytest.raises(ValueError, match="engine_overlap must be auto, on or off, got 'yes'"):
        Engine.from_settings(Settings(model=tiny_checkpoint, engine_overlap="yes"))
