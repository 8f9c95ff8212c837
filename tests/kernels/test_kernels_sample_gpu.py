"""The Gumbel-max draw (kernels/sample.py) compiled, at gpt-oss's vocabulary, and through the engine (GPU only)."""

import pytest
import torch
from sample_cases import check_distribution, check_greedy_and_finite, check_seeds

from services.worker.engine.engine import Engine
from services.worker.model import load_model, make_checkpoint
from shared.protocol import SamplingParams

pytestmark = pytest.mark.gpu

VOCAB = 201088


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_greedy_and_finite(rows):
    check_greedy_and_finite("cuda", VOCAB, rows)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_distribution(temperature):
    print(f"chi-square {check_distribution('cuda', VOCAB, draws=20000, temperature=temperature):.1f}")


def test_seeds():
    check_seeds("cuda", VOCAB)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "20b-1layer"), seed=3, preset="20b",
                           num_hidden_layers=1)
    return load_model(path, backend="cuda")


def _tokens(model, temperature: float, seed: int) -> dict[str, list[int]]:
    engine = Engine(model, num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256, seed=seed)
    gen = torch.Generator().manual_seed(5)
    for i, n in enumerate((9, 120, 1)):
        engine.add_request(f"r{i}", torch.randint(0, VOCAB, (n,), generator=gen).tolist(),
                           SamplingParams(max_tokens=12, temperature=temperature, ignore_eos=True))
    tokens = {f"r{i}": [] for i in range(3)}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.token_ids
    return tokens


def test_engine_draws_with_the_kernels(model, monkeypatch):
    """Greedy tokens are the torch path's; a seeded engine replays its temperature-1 draws; both 12 long."""
    fused = _tokens(model, 0.0, seed=0)
    monkeypatch.setenv("ROSE_FUSED_SAMPLING", "0")
    assert _tokens(model, 0.0, seed=0) == fused
    monkeypatch.delenv("ROSE_FUSED_SAMPLING")
    first, again, other = (_tokens(model, 1.0, seed=s) for s in (7, 7, 8))
    assert first == again and first != other
    assert all(len(t) == 12 for t in first.values())
