"""Prompt chunks' steps through the prefill graphs against the same steps run eagerly (GPU only).

cuda_prefill_graphs.py replays everything but attention from graphs captured per token bucket,
the step's tokens padded up to the bucket. One model, two KV caches fed the same steps: with
cuda_graphs on (the prefill graphs) and off (eager, taking triton-kernels' experts at the same
rows where it imports, so both run the same kernels). Steps of several buckets, one after
another, mixed with decode rows: a segment that read a stale buffer, a padding row that leaked
into a real one or a bucket replayed with another's graphs would move the logits or the keys.
"""

import pytest
import torch

from kernel_checks import assert_same_real_blocks, graphs_against_eager, step_batch
from services.worker.model import load_model, make_checkpoint

pytestmark = pytest.mark.gpu

BLOCK = 16
WINDOW = 128
PAGES = 96  # per sequence: room for 1536 tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "20b-2layer"), seed=5, preset="20b",
                           num_hidden_layers=2, device="cuda")
    loaded = load_model(path, backend="cuda")
    for layer in loaded.layers:  # eager steps take triton-kernels' experts where the graphs do
        layer["moe"].tk_eager_rows = 1
    return loaded


def _step(seq_ids, contexts, new_tokens, vocab):
    return step_batch(seq_ids, contexts, new_tokens, vocab, PAGES, BLOCK, WINDOW)


def test_prefill_graphs_match_eager(model):
    vocab = model.config.vocab_size
    blocks = {"full": 4 * PAGES, "sliding": 4 * PAGES}
    kv_graph, kv_eager = model.make_kv_cache(blocks, BLOCK), model.make_kv_cache(blocks, BLOCK)
    steps = [
        _step([0, 1, 2], [0, 0, 0], [150, 40, 200], vocab),  # 390 tokens: bucket 512
        _step([0, 1, 2, 3], [150, 40, 200, 0], [1, 1, 300, 1100], vocab),  # 1402: bucket 1536, chunks past the window
        _step([0, 1, 2, 3], [151, 41, 500, 1100], [1, 1, 1, 100], vocab),  # 103: a 100-token chunk, past decode rows: bucket 128
        _step([0, 1, 2], [152, 42, 501], [1, 130, 1], vocab),  # 132: bucket 256
        _step([0, 1, 2, 3], [153, 172, 502, 1200], [1, 1, 1, 1], vocab),  # decode
    ]
    worst = graphs_against_eager(model, steps, kv_graph, kv_eager)
    print(f"worst prefill graphs vs eager logits over {len(steps)} steps: {worst:.2e}; buckets captured "
          f"{sorted(model.prefill_graphs.captured)}")
    assert sorted(model.prefill_graphs.captured) == [128, 256, 512, 1536]
    assert_same_real_blocks(kv_graph, kv_eager)


def test_prefill_graphs_off_runs_eagerly(model, monkeypatch):
    monkeypatch.setenv("ROSE_PREFILL_GRAPHS", "0")
    model.prefill_graphs = None
    kv = model.make_kv_cache({"full": PAGES, "sliding": PAGES}, BLOCK)
    logits = model(_step([0], [0], [300], model.config.vocab_size), kv)
    assert model.prefill_graphs is None and torch.isfinite(logits).all()
