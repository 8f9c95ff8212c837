"""The cuda backend's logits against the torch backend's (GPU only).

Both bf16 paths are compared with the float32 torch model on the same checkpoint and
batch: the cuda backend must be about as close to it as the torch bf16 path is.
"""

import pytest
import torch

from kernel_checks import rel_err
from services.worker.model import ForwardBatch, load_model, make_checkpoint

pytestmark = pytest.mark.gpu

BLOCK = 16


def _steps(prompt_lens, vocab, blocks_per_seq):
    """A prefill of every prompt, then one decode token each: (batch, batch)."""
    tables = {g: [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(len(prompt_lens))]
              for g in ("full", "sliding")}
    ids = [torch.randint(0, vocab, (n + 1,)) for n in prompt_lens]
    prefill = ForwardBatch(
        token_ids=torch.cat([i[:-1] for i in ids]), positions=torch.cat([torch.arange(n) for n in prompt_lens]),
        query_lens=list(prompt_lens), context_lens=list(prompt_lens), block_tables=tables)
    decode = ForwardBatch(
        token_ids=torch.stack([i[-1] for i in ids]), positions=torch.tensor(prompt_lens),
        query_lens=[1] * len(prompt_lens), context_lens=[n + 1 for n in prompt_lens], block_tables=tables)
    return prefill, decode


def _logits(model, steps, num_blocks):
    """The prefill's logits at every prompt token, then the decode step's (one row a sequence)."""
    kv = model.make_kv_cache({"full": num_blocks, "sliding": num_blocks}, BLOCK)
    prefill, decode = steps
    return [model(prefill, kv, all_logits=True), model(decode, kv)]


@pytest.fixture(scope="module")
def checkpoint_20b_2layer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "gpt-oss-20b-2layer")
    return make_checkpoint(path, seed=1, preset="20b", num_hidden_layers=2)


def _row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Each row's ||out - ref|| / ||ref|| (one row: one token's logits), float64."""
    out, ref = out.double(), ref.double()
    return (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


@pytest.mark.parametrize("which", ["tiny", "20b-2layer", "20b-2layer-flashinfer", "20b-2layer-xqa", "20b-2layer-fa3"])
def test_cuda_backend_logits_match_torch(which, request, monkeypatch):
    path = request.getfixturevalue("tiny_checkpoint" if which == "tiny" else "checkpoint_20b_2layer")
    if which.endswith(("flashinfer", "xqa")):  # decode attention through the prefill's sink wrapper or XQA,
        monkeypatch.setenv("ROSE_DECODE_ATTENTION", which.rsplit("-", 1)[1])  # not kernels/split_decode.py
    if which.endswith("fa3"):  # the prefill (its 1-token prompt sends it to fa2 under auto) through fa3
        monkeypatch.setenv("ROSE_PREFILL_ATTENTION", "fa3")
    prompt_lens = [5, 200, 33, 1, 17, 64, 129, 90]  # 200 crosses the sliding window of both checkpoints
    blocks_per_seq = (max(prompt_lens) + 1 + BLOCK - 1) // BLOCK
    num_blocks = blocks_per_seq * len(prompt_lens)

    ref_model = load_model(path, device="cuda", dtype=torch.float32)
    steps = _steps(prompt_lens, ref_model.config.vocab_size, blocks_per_seq)
    ref = _logits(ref_model, steps, num_blocks)
    del ref_model
    bf16 = _logits(load_model(path, device="cuda", dtype=torch.bfloat16), steps, num_blocks)
    cuda_model = load_model(path, backend="cuda")
    assert type(cuda_model).__name__ == "CudaGptOss"
    ours = _logits(cuda_model, steps, num_blocks)
    # the 539-token prefill replayed the prefill graphs around FlashInfer's attentions (cuda_prefill_graphs.py);
    # without FlashInfer (the tiny model's head dim) everything runs eagerly
    graphed = cuda_model.prefill_graphs is not None and list(cuda_model.prefill_graphs.captured) == [640]
    assert graphed == (cuda_model.attention is not None), which
    if cuda_model.attention is not None:  # the family that ran the prefill, a step with a 1-token prompt
        family = "fa3" if which.endswith("fa3") else "fa2"
        assert cuda_model.attention.wrappers and cuda_model.attention.backend == family
    # Per token row, the median: on random weights a router near-tie now and then puts one token on another
    # expert in bf16 (torch's or ours) and moves that row's logits by ~1e-1; a kernel's error moves them all.
    for name, r, b, o in zip(("prefill", "decode"), ref, bf16, ours):
        assert not torch.isnan(o).any(), name
        err_torch, err_cuda = _row_errors(b, r), _row_errors(o, r)
        med_torch, med_cuda = float(err_torch.median()), float(err_cuda.median())
        print(f"{which} {name}: torch bf16 {rel_err(b, r):.2e}, cuda {rel_err(o, r):.2e} (vs float32 torch); "
              f"row median {med_torch:.2e} / {med_cuda:.2e}, rows over 5e-2 {int((err_torch > 5e-2).sum())} / "
              f"{int((err_cuda > 5e-2).sum())} of {len(r)}")
        assert med_cuda <= max(2 * med_torch, 1e-2)


def test_prompt_chunks_as_decode_rows_match_torch(checkpoint_20b_2layer):
    """A step of decode rows and short prompt chunks (a cached prefix's tail, a new short prompt), which the
    cuda backend replays as a decode graph one row a token (cuda_graphs.as_decode_rows), against the float32
    torch model running it as a prefill: the same attention, window and sinks, row by row."""
    contexts = [150, 40, 200, 20, 64, 300, 0, 10, 130, 1]  # 200 and 300: the extensions start past the window
    new = [1, 16, 5, 12, 3, 1, 9, 30, 16, 2]  # 95 rows: bucket 128
    blocks_per_seq = (max(c + n for c, n in zip(contexts, new)) + BLOCK - 1) // BLOCK
    num_blocks = blocks_per_seq * len(contexts)
    tables = {g: [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(len(contexts))]
              for g in ("full", "sliding")}
    vocab = load_model(checkpoint_20b_2layer, backend="cuda").config.vocab_size
    ids = [torch.randint(0, vocab, (c + n,)) for c, n in zip(contexts, new)]
    seen = [s for s, c in enumerate(contexts) if c]
    prefill = ForwardBatch(  # eager everywhere: its chunks are past 64 tokens
        token_ids=torch.cat([ids[s][:contexts[s]] for s in seen]),
        positions=torch.cat([torch.arange(contexts[s]) for s in seen]), query_lens=[contexts[s] for s in seen],
        context_lens=[contexts[s] for s in seen], block_tables={g: [t[s] for s in seen] for g, t in tables.items()})
    mixed = ForwardBatch(
        token_ids=torch.cat([i[c:] for i, c in zip(ids, contexts)]),
        positions=torch.cat([torch.arange(c, c + n) for c, n in zip(contexts, new)]), query_lens=new,
        context_lens=[c + n for c, n in zip(contexts, new)], block_tables=tables)

    def logits(model):
        kv = model.make_kv_cache({"full": num_blocks, "sliding": num_blocks}, BLOCK)
        model(prefill, kv)
        return model(mixed, kv).clone()

    ref_model = load_model(checkpoint_20b_2layer, device="cuda", dtype=torch.float32)
    ref = logits(ref_model)
    del ref_model
    bf16 = logits(load_model(checkpoint_20b_2layer, device="cuda", dtype=torch.bfloat16))
    cuda_model = load_model(checkpoint_20b_2layer, backend="cuda")
    ours = logits(cuda_model)
    assert cuda_model.graphs is not None and list(cuda_model.graphs.captured) == [128], "the mixed step ran eagerly"
    err_torch, err_cuda = _row_errors(bf16, ref), _row_errors(ours, ref)
    med_torch, med_cuda = float(err_torch.median()), float(err_cuda.median())
    print(f"mixed step, rows: torch bf16 row median {med_torch:.2e}, cuda {med_cuda:.2e} (vs float32 torch); rows "
          f"over 5e-2 {int((err_torch > 5e-2).sum())} / {int((err_cuda > 5e-2).sum())} of {len(ref)}")
    assert not torch.isnan(ours).any()
    assert med_cuda <= max(2 * med_torch, 1e-2)


def test_grouped_linear_matches_loop():
    from services.worker.model.cuda_moe import grouped_linear, grouped_linear_reference

    experts, rows = 32, 4096 * 4
    counts = torch.bincount(torch.randint(0, experts, (rows,)), minlength=experts)
    counts[3] = 0  # an expert nobody picked
    ends = torch.cumsum(counts, 0).to(torch.int32).cuda()
    x = torch.randn(int(ends[-1]), 2880, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, 5760, 2880, device="cuda", dtype=torch.bfloat16) / 50
    assert rel_err(grouped_linear(x, w, ends), grouped_linear_reference(x, w, ends)) <= 1e-2
