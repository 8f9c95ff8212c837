"""Sampling semantics on hand-made logits: greedy, truncation, seeds, penalties, logprobs, param checks."""

from __future__ import annotations

import math

import pytest
import torch

from services.worker.engine.errors import EngineInputError
from services.worker.engine.sampler import CDF_CHUNK, SamplingRow, check_params, draw_shared, make_generator, sample
from shared.protocol import SamplingParams

VOCAB = 8


def row(prompt=(0,), output=(), seed=None, **params) -> SamplingRow:
    generator = make_generator(seed, torch.device("cpu")) if seed is not None else None
    return SamplingRow(SamplingParams(**params), list(prompt) + list(output), len(prompt), generator)


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(1))
    out = sample(logits, [row(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [row(temperature=1.5, top_k=1) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_and_full_min_p_keep_only_the_best_token():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    rows = [row(top_p=1e-6), row(min_p=1.0), row(top_p=1e-6, seed=7), row(min_p=1.0, seed=8)]
    assert sample(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_draws_follow_the_softmax_distribution():
    logits = logits_of([2.0, 1.0, 0.0, -1.0, -30, -30, -30, -30])
    probs = torch.softmax(logits[0], -1)
    n = 3000
    out = sample(logits.expand(n, VOCAB), [row() for _ in range(n)], torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=VOCAB).float() / n
    assert torch.allclose(counts, probs, atol=0.03), (counts, probs)


def test_unseeded_draws_over_a_vocabulary_of_many_chunks_follow_the_softmax():
    # mass in the first chunk, in a middle chunk and in the short last chunk, the rest ~0
    vocab = 3 * CDF_CHUNK + 37
    logits = torch.full((1, vocab), -40.0)
    hot = [0, 5, CDF_CHUNK + 17, 2 * CDF_CHUNK - 1, 3 * CDF_CHUNK + 36]
    logits[0, hot] = torch.tensor([1.0, 0.0, 0.5, -0.5, 0.8])
    before = logits.clone()
    n = 4000
    out = sample(logits.expand(n, vocab), [row() for _ in range(n)], torch.Generator().manual_seed(3))
    assert torch.equal(logits, before)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).float() / n
    assert set(out.token_ids) <= set(hot)
    assert torch.allclose(counts[hot], torch.softmax(logits[0], -1)[hot], atol=0.03), counts[hot]


@pytest.mark.parametrize("race", [True, False])
def test_both_shared_stream_draws_follow_the_weights(race):
    """The GPU's exponential race and the CPU's inverse CDF, each on the CPU: the same distribution."""
    vocab = 2 * CDF_CHUNK + 5
    weights = torch.zeros(vocab)
    hot = [3, CDF_CHUNK + 1, 2 * CDF_CHUNK + 4]
    weights[hot] = torch.tensor([0.5, 0.3, 0.2])
    n = 4000
    drawn = draw_shared(weights.expand(n, vocab).contiguous(), torch.Generator().manual_seed(9), race=race)
    assert drawn.dtype == torch.long and drawn.shape == (n,)
    assert set(drawn.tolist()) <= set(hot)  # zero weight is never drawn
    counts = torch.bincount(drawn, minlength=vocab).float() / n
    assert torch.allclose(counts[hot], weights[hot], atol=0.03), counts[hot]


def test_the_cpu_draws_by_inverse_cdf_by_default():
    weights = torch.softmax(torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1)), -1)
    # on the CPU the default is the inverse CDF: the same generator state gives the same draws as race=False
    assert torch.equal(draw_shared(weights, torch.Generator().manual_seed(2)),
                       draw_shared(weights, torch.Generator().manual_seed(2), race=False))


def test_unseeded_draws_never_pick_a_masked_token():
    vocab = 2 * CDF_CHUNK
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(4))
    out = sample(logits, [row(top_k=3) for _ in range(64)], torch.Generator().manual_seed(5))
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(out.token_ids))


def test_top_k_and_top_p_restrict_the_support():
    logits = logits_of([3.0, 2.9, 2.8, 2.7, 0, 0, 0, 0])
    n = 400
    gen = torch.Generator().manual_seed(0)
    top_k = sample(logits.expand(n, VOCAB), [row(top_k=2) for _ in range(n)], gen).token_ids
    assert set(top_k) == {0, 1}
    # probabilities ~[.29,.26,.24,.21,...]: top_p 0.5 keeps the two tokens that reach 0.5
    top_p = sample(logits.expand(n, VOCAB), [row(top_p=0.5) for _ in range(n)], gen).token_ids
    assert set(top_p) == {0, 1}
    # min_p 0.5 of the best drops only the zero-logit tail
    min_p = sample(logits.expand(n, VOCAB), [row(min_p=0.5) for _ in range(n)], gen).token_ids
    assert set(min_p) == {0, 1, 2, 3}


def test_low_temperature_sharpens():
    logits = logits_of([1.0, 0.5, 0, 0, 0, 0, 0, 0])
    n = 500
    gen = torch.Generator().manual_seed(0)
    hot = sample(logits.expand(n, VOCAB), [row(temperature=1.0) for _ in range(n)], gen).token_ids
    cold = sample(logits.expand(n, VOCAB), [row(temperature=0.05) for _ in range(n)], gen).token_ids
    assert hot.count(0) < 0.6 * n and cold.count(0) > 0.99 * n


def test_seed_reproducible_and_independent_of_the_batch():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, VOCAB, generator=gen)
    seeded = row(seed=42)
    sequence_alone = [sample(logits[1:2], [seeded]).token_ids[0] for _ in range(20)]
    seeded_again = row(seed=42)
    batched = []
    for step in range(20):
        rows = [row(), seeded_again, row(seed=step), row()]
        batched.append(sample(logits, rows, gen).token_ids[1])
    assert sequence_alone == batched
    other_seed = row(seed=43)
    assert [sample(logits[1:2], [other_seed]).token_ids[0] for _ in range(20)] != sequence_alone


def test_a_seeded_row_ignores_the_truncation_of_its_batch_mates():
    logits = torch.randn(3, 4 * VOCAB, generator=torch.Generator().manual_seed(6))
    alone = row(seed=11, temperature=1.2)
    expected = [sample(logits[1:2], [alone]).token_ids[0] for _ in range(30)]
    batched = row(seed=11, temperature=1.2)
    got = [sample(logits, [row(top_p=0.3), batched, row(top_k=2, seed=step)]).token_ids[1] for step in range(30)]
    assert got == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # token 0 (positive, seen in prompt) and 1 (negative, seen in output) are penalised
    logits = logits_of([2.0, -1.0, 1.5, -1.2, -5, -5, -5, -5])
    greedy = dict(temperature=0.0, logprobs=0)
    plain = sample(logits, [row(prompt=[0], output=[1], **greedy)])
    assert plain.token_ids == [0]
    penalised = sample(logits, [row(prompt=[0], output=[1], repetition_penalty=2.0, **greedy)])
    assert penalised.token_ids == [2]  # 2.0 / 2 = 1.0 < 1.5
    # -1.0 * 2 = -2.0 now ranks below the unseen -1.2
    only_negative = logits_of([-1.0, -1.1, -1.2, -9, -9, -9, -9, -9])
    assert sample(only_negative, [row(prompt=[5], output=[0], repetition_penalty=2.0, temperature=0.0)]).token_ids == [1]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = logits_of([1.0, 0.8, 0.1, 0, 0, 0, 0, 0])
    # token 0 in the prompt only: no frequency/presence penalty
    assert sample(logits, [row(prompt=[0, 0, 0], frequency_penalty=2.0, temperature=0.0)]).token_ids == [0]
    # once in the output: 1.0 - 0.3 = 0.7 < 0.8
    assert sample(logits, [row(output=[0], presence_penalty=0.3, temperature=0.0)]).token_ids == [1]
    # frequency scales with the count: three times 0.1 gives 0.7 < 0.8, once gives 0.9
    assert sample(logits, [row(output=[0, 0, 0], frequency_penalty=0.1, temperature=0.0)]).token_ids == [1]
    assert sample(logits, [row(output=[0], frequency_penalty=0.1, temperature=0.0)]).token_ids == [0]
    # a negative penalty encourages repeating
    assert sample(logits, [row(output=[2], presence_penalty=-1.0, temperature=0.0)]).token_ids == [2]


def test_logprobs_are_the_raw_model_log_softmax():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(9))
    rows = [row(logprobs=3, temperature=0.7, output=[1, 1], frequency_penalty=2.0), row(), row(logprobs=0, seed=1)]
    out = sample(logits, rows)
    reference = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    for i in (0, 2):
        assert math.isclose(out.logprobs[i], reference[i, out.token_ids[i]].item(), abs_tol=1e-6)
    values, ids = reference[0].topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.top_logprobs[2] == []


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=1.5), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.1), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(presence_penalty=-3), "presence_penalty"),
        (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(seed="x"), "seed"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_bad_params_are_refused_with_the_field_named(params, field):
    with pytest.raises(EngineInputError, match=field):
        check_params(SamplingParams(**params), VOCAB)


def test_good_params_pass():
    check_params(SamplingParams(temperature=0, top_k=-1, seed=-5, logprobs=20, stop_token_ids=[VOCAB - 1]), VOCAB)
    with pytest.raises(EngineInputError, match="SamplingParams"):
        check_params({"max_tokens": 3}, VOCAB)
