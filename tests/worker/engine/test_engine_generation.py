"""Greedy and seeded generation through the real model: batching, paging, chunking and the
prefix cache change nothing in the tokens; logprobs are the model's."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import MAX_MODEL_LEN, WINDOW, generate_contiguous, greedy, prompt, run_all

from services.worker.model.batch import ForwardBatch
from shared.protocol import SamplingParams

# Longer than the 16-token window, some longer than the 64-token step budget.
LENGTHS = [5, 23, 41, 70]


@pytest.fixture(scope="module")
def references(small_model):
    """Greedy tokens of each prompt alone in one contiguous cache."""
    return {n: generate_contiguous(small_model, prompt(n, seed=n), greedy(12)).token_ids for n in LENGTHS}


def test_reference_runs_past_the_window(references):
    assert all(len(tokens) == 12 for tokens in references.values())
    assert max(LENGTHS) + 12 > 4 * WINDOW


def test_batched_paged_matches_alone_contiguous(make_engine, references):
    engine = make_engine()
    for n in LENGTHS:
        engine.add_request(f"p{n}", prompt(n, seed=n), greedy(12))
    results = run_all(engine)
    for n in LENGTHS:
        assert results[f"p{n}"].token_ids == references[n], n
        assert results[f"p{n}"].last.finish_reason == "length"
        assert results[f"p{n}"].last.prompt_tokens == n


@pytest.mark.parametrize("budget", [7, 16])
def test_chunked_prefill_matches_one_shot(make_engine, references, budget):
    engine = make_engine(max_num_batched_tokens=budget, block_size=8)
    for n in LENGTHS[1:]:
        engine.add_request(f"p{n}", prompt(n, seed=n), greedy(12))
    before = engine.stats()
    steps = 0
    results = {}
    while engine.has_work():
        prev = engine.stats()
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
        now = engine.stats()
        computed = (now.prefill_tokens_computed + now.decode_tokens_computed
                    - prev.prefill_tokens_computed - prev.decode_tokens_computed)
        assert computed <= budget
        steps += 1
    assert steps > sum(LENGTHS[1:]) // budget  # the prompts really went in chunks
    for n in LENGTHS[1:]:
        assert results[f"p{n}"] == references[n]
    assert engine.stats().prefill_tokens_computed - before.prefill_tokens_computed == sum(LENGTHS[1:])


def test_requests_join_and_leave_between_steps(make_engine, references):
    engine = make_engine()
    results = {}
    engine.add_request("first", prompt(41, seed=41), greedy(12))
    for _ in range(3):
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
    engine.add_request("late", prompt(23, seed=23), greedy(12))
    while engine.has_work():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
    assert results["first"] == references[41] and results["late"] == references[23]


def test_prefix_cache_hit_skips_prefill_and_keeps_tokens(make_engine, small_model):
    engine = make_engine()
    shared = prompt(37, seed=1)
    first = shared + prompt(6, seed=2)
    second = shared + prompt(9, seed=3)
    engine.add_request("first", first, greedy(8))
    run_all(engine)
    before = engine.stats()
    engine.add_request("second", second, greedy(8))
    result = run_all(engine)["second"]
    after = engine.stats()
    hit = (37 // 4) * 4  # block aligned
    assert result.last.cached_tokens == hit
    assert after.prefill_tokens_computed - before.prefill_tokens_computed == len(second) - hit
    assert after.cached_prompt_tokens - before.cached_prompt_tokens == hit
    assert result.token_ids == generate_contiguous(small_model, second, greedy(8)).token_ids


def test_same_prompt_again_recomputes_only_the_last_token(make_engine, references):
    engine = make_engine()
    tokens = prompt(41, seed=41)
    engine.add_request("a", tokens, greedy(12))
    run_all(engine)
    before = engine.stats().prefill_tokens_computed
    engine.add_request("b", tokens, greedy(12))
    result = run_all(engine)["b"]
    assert result.last.cached_tokens == 40
    assert engine.stats().prefill_tokens_computed - before == 1
    assert result.token_ids == references[41]


def test_prefix_hit_after_generated_tokens(make_engine, small_model):
    """A follow-up turn reuses the blocks of the previous prompt and its answer."""
    engine = make_engine()
    tokens = prompt(30, seed=5)
    engine.add_request("turn1", tokens, greedy(14))
    answer = run_all(engine)["turn1"].token_ids
    follow = tokens + answer + prompt(5, seed=6)
    engine.add_request("turn2", follow, greedy(6))
    result = run_all(engine)["turn2"]
    computed_before = len(tokens) + len(answer) - 1  # the last sampled token never ran
    assert result.last.cached_tokens == (computed_before // 4) * 4
    assert result.token_ids == generate_contiguous(small_model, follow, greedy(6)).token_ids


def test_seeded_sampling_is_reproducible_alone_and_batched(make_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    tokens = prompt(23, seed=23)
    alone = make_engine()
    alone.add_request("s", tokens, params)
    expected = run_all(alone)["s"].token_ids
    batched = make_engine(seed=99)
    batched.add_request("noise1", prompt(41, seed=41), SamplingParams(max_tokens=12, temperature=1.0))
    batched.add_request("s", tokens, params)
    batched.add_request("noise2", prompt(5, seed=5), SamplingParams(max_tokens=5, temperature=0.8, seed=7))
    assert run_all(batched)["s"].token_ids == expected
    other = make_engine()
    other.add_request("s", tokens, SamplingParams(max_tokens=12, temperature=1.0, seed=4321))
    assert run_all(other)["s"].token_ids != expected


def test_top_k_one_equals_greedy(make_engine, references):
    engine = make_engine()
    engine.add_request("k1", prompt(41, seed=41), SamplingParams(max_tokens=12, temperature=1.3, top_k=1))
    assert run_all(engine)["k1"].token_ids == references[41]


def test_logprobs_match_the_model_logits(make_engine, small_model):
    engine = make_engine()
    tokens = prompt(23, seed=8)
    engine.add_request("lp", tokens, SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=5))
    result = run_all(engine)["lp"]
    assert len(result.logprobs) == len(result.token_ids) == len(result.top_logprobs) == 6
    # Reference: the whole sequence in one forward pass, logits at every position.
    full = tokens + result.token_ids
    kv = small_model.make_kv_cache({"full": 1, "sliding": 1}, MAX_MODEL_LEN)
    batch = ForwardBatch(
        token_ids=torch.tensor(full), positions=torch.arange(len(full)), query_lens=[len(full)],
        context_lens=[len(full)], block_tables={"full": [[0]], "sliding": [[0]]},
    )
    logprobs = torch.log_softmax(small_model(batch, kv, all_logits=True), dim=-1)
    for i, token in enumerate(result.token_ids):
        row = logprobs[len(tokens) - 1 + i]
        assert math.isclose(result.logprobs[i], row[token].item(), abs_tol=1e-4)
        values, ids = row.topk(5)
        assert [t for t, _ in result.top_logprobs[i]] == ids.tolist()
        assert [v for _, v in result.top_logprobs[i]] == pytest.approx(values.tolist(), abs=1e-4)
        assert all(v <= 0 for _, v in result.top_logprobs[i])
