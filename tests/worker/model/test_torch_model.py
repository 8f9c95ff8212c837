"""The torch forward pass: parity with transformers, paged-cache consistency, per-layer overrides."""

from __future__ import annotations

import math

import pytest
import torch

from services.worker.model import NO_BLOCK, Checkpoint, ForwardBatch, load_model, make_checkpoint
from services.worker.model.rope import yarn_inv_freq

VOCAB = 512  # small for speed; the tiny default keeps the real 201088
SMALL = dict(vocab_size=VOCAB, pad_token_id=None, eos_token_id=None)
BLOCK = 8
WINDOW = 32  # TINY's window; the sequences below run well past it


@pytest.fixture(scope="module")
def parity_path(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("parity") / "ckpt"), seed=1, **SMALL)


@pytest.fixture(scope="module")
def model(parity_path):
    return load_model(parity_path, device="cpu", dtype=torch.float32)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


class Pool:
    """Hands out shuffled block ids per group, as a block manager would."""

    def __init__(self, num_blocks: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.free = {grp: torch.randperm(num_blocks, generator=g).tolist() for grp in ("full", "sliding")}

    def grow(self, tables: dict[str, list[int]], context_len: int) -> None:
        for group, table in tables.items():
            while len(table) * BLOCK < context_len:
                table.append(self.free[group].pop())


def _run_one_shot(model, ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """All logits of ids fed in one step: [n, vocab]."""
    n = len(ids)
    kv = model.make_kv_cache({"full": 64, "sliding": 64}, BLOCK)
    tables = {"full": [], "sliding": []}
    Pool(64, seed).grow(tables, n)
    batch = ForwardBatch(ids, torch.arange(n), [n], [n], {g: [t] for g, t in tables.items()})
    return model(batch, kv, all_logits=True)


def test_matches_transformers(parity_path, model):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    # transformers dequantizes the MXFP4 experts itself (its CPU path) into float32 parameters
    hf, info = transformers.GptOssForCausalLM.from_pretrained(
        parity_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    assert model.config.layer_groups == ["sliding", "full", "sliding", "full"]
    ids = _tokens(300, seed=0)  # window 32: most positions see only part of the context
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    ours = _run_one_shot(model, ids)
    assert ours.shape == (300, VOCAB) and ours.dtype == torch.float32
    assert expected.std() > 1.0  # logits are spread, so agreement means something
    assert (ours - expected).abs().max() <= 1e-4


def test_chunks_and_batches_give_the_same_logits(model):
    """One sequence in growing chunks, sharing steps with others, with shuffled blocks and dropped windows."""
    lengths = {"a": 150, "b": 70, "c": 45}
    ids = {name: _tokens(n, seed=i + 10) for i, (name, n) in enumerate(lengths.items())}
    expected = {name: _run_one_shot(model, ids[name], seed=i + 3) for i, name in enumerate(lengths)}
    # per step: (sequence, new tokens); "c" joins late, decodes run beside prefills
    schedule = [
        [("a", 40)],
        [("a", 1), ("b", 30)],
        [("b", 25), ("a", 50), ("c", 1)],
        [("c", 30), ("a", 1), ("b", 1)],
        [("a", 1), ("c", 1), ("b", 14)],
        [("a", 57), ("c", 13)],
    ]
    kv = model.make_kv_cache({"full": 64, "sliding": 64}, BLOCK)
    pool = Pool(64, seed=99)
    done = {name: 0 for name in lengths}
    tables = {name: {"full": [], "sliding": []} for name in lengths}
    for step in schedule:
        token_ids, positions, query_lens, context_lens = [], [], [], []
        for name, count in step:
            start = done[name]
            token_ids.append(ids[name][start:start + count])
            positions.append(torch.arange(start, start + count))
            query_lens.append(count)
            context_lens.append(start + count)
            pool.grow(tables[name], start + count)
            # the sliding group drops blocks wholly older than the window of the first new token;
            # poison them so reading one would show
            sliding = tables[name]["sliding"]
            for b in range(len(sliding)):
                if sliding[b] != NO_BLOCK and (b + 1) * BLOCK <= start - WINDOW + 1:
                    for layer, group in enumerate(model.config.layer_groups):
                        if group == "sliding":
                            kv.k[layer][sliding[b]] = float("nan")
                            kv.v[layer][sliding[b]] = float("nan")
                    pool.free["sliding"].append(sliding[b])
                    sliding[b] = NO_BLOCK
        batch = ForwardBatch(
            torch.cat(token_ids), torch.cat(positions), query_lens, context_lens,
            {g: [list(tables[name][g]) for name, _ in step] for g in ("full", "sliding")},
        )
        all_logits = model(batch, kv, all_logits=True)
        last = model(batch, _copy_cache(kv), all_logits=False)
        offset = 0
        for s, (name, count) in enumerate(step):
            got = all_logits[offset:offset + count]
            want = expected[name][done[name]:done[name] + count]
            assert (got - want).abs().max() <= 1e-4, (name, done[name], count)
            assert (last[s] - got[-1]).abs().max() <= 1e-5
            offset += count
            done[name] += count
    assert done == lengths
    assert any(NO_BLOCK in tables[name]["sliding"] for name in lengths)


def _copy_cache(kv):
    """A second cache with the same content (running a step twice must not double-write the original)."""
    from services.worker.model.batch import PagedKVCache

    return PagedKVCache([k.clone() for k in kv.k], [v.clone() for v in kv.v], kv.layer_groups, kv.block_size)


# ---------------------------------------------------------------------- per-layer overrides
def _reference_logits(state: dict, config, ids: torch.Tensor) -> torch.Tensor:
    """A direct, token-by-token gpt-oss forward over dense weights: [n, vocab]."""
    n, heads, kv_heads, dim = len(ids), config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inv_freq, concentration = yarn_inv_freq(config)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos() * concentration, angles.sin() * concentration

    def rotate(x):
        a, b = x.chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * weight

    x = state["model.embed_tokens.weight"][ids]
    for layer in range(config.num_hidden_layers):
        w = {k[len(f"model.layers.{layer}."):]: v for k, v in state.items() if k.startswith(f"model.layers.{layer}.")}
        h = norm(x, w["input_layernorm.weight"])
        q = rotate((h @ w["self_attn.q_proj.weight"].T + w["self_attn.q_proj.bias"]).view(n, heads, dim))
        k = rotate((h @ w["self_attn.k_proj.weight"].T + w["self_attn.k_proj.bias"]).view(n, kv_heads, dim))
        v = (h @ w["self_attn.v_proj.weight"].T + w["self_attn.v_proj.bias"]).view(n, kv_heads, dim)
        window = config.window_of(layer)
        attn = torch.zeros(n, heads, dim)
        for i in range(n):
            lo = 0 if window is None else max(0, i - window + 1)
            for head in range(heads):
                kvh = head // (heads // kv_heads)
                scores = k[lo:i + 1, kvh] @ q[i, head] / math.sqrt(dim)
                probs = torch.softmax(torch.cat((scores, w["self_attn.sinks"][head:head + 1])), 0)[:-1]
                attn[i, head] = probs @ v[lo:i + 1, kvh]
        x = x + attn.view(n, -1) @ w["self_attn.o_proj.weight"].T + w["self_attn.o_proj.bias"]
        h = norm(x, w["post_attention_layernorm.weight"])
        moe = torch.zeros_like(x)
        for i in range(n):
            router = h[i] @ w["mlp.router.weight"].T + w["mlp.router.bias"]
            top, chosen = torch.topk(router, config.num_experts_per_tok)
            for weight, e in zip(torch.softmax(top, 0), chosen.tolist()):
                gu = w["mlp.experts.gate_up_proj"][e] @ h[i] + w["mlp.experts.gate_up_proj_bias"][e]
                gate, up = gu[0::2].clamp(max=config.swiglu_limit), gu[1::2].clamp(-config.swiglu_limit, config.swiglu_limit)
                act = (up + 1) * gate * torch.sigmoid(config.swiglu_alpha * gate)
                moe[i] += weight * (w["mlp.experts.down_proj"][e] @ act + w["mlp.experts.down_proj_bias"][e])
        x = x + moe
    return norm(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


def test_per_layer_experts_and_windows(tmp_path):
    path = make_checkpoint(
        str(tmp_path / "pruned"), seed=5,
        num_experts_per_layer=[8, 5, 6, 4],
        # layer 1 was a full layer; here it slides with its own small window
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        sliding_window_per_layer=[32, 8, 16, None],
        **SMALL,
    )
    model = load_model(path)
    assert model.config.layer_groups == ["sliding", "sliding", "sliding", "full"]
    assert [model.model.layers[i].mlp.experts.down_proj.shape[0] for i in range(4)] == [8, 5, 6, 4]
    ids = _tokens(60, seed=7)
    expected = _reference_logits(Checkpoint(path).load_state(), model.config, ids)
    assert (_run_one_shot(model, ids) - expected).abs().max() <= 1e-4
    # and in two steps, the second past every window
    kv = model.make_kv_cache({"full": 16, "sliding": 16}, BLOCK)
    tables = {"full": list(range(8)), "sliding": list(range(15, 7, -1))}
    first = ForwardBatch(ids[:20], torch.arange(20), [20], [20], {g: [t[:3]] for g, t in tables.items()})
    model(first, kv)
    second = ForwardBatch(ids[20:], torch.arange(20, 60), [40], [60], {g: [t] for g, t in tables.items()})
    assert (model(second, kv, all_logits=True) - expected[20:]).abs().max() <= 1e-4


# ---------------------------------------------------------------------- dtypes, the default model, errors
def test_bfloat16_tracks_float32(parity_path, model):
    ids = _tokens(80, seed=8)
    exact = _run_one_shot(model, ids)
    half = load_model(parity_path, dtype="bfloat16")
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    approx = _run_one_shot(half, ids)
    assert approx.dtype == torch.float32 and torch.isfinite(approx).all()
    assert (approx - exact).abs().mean() < 0.05 * exact.std()
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_tiny_default_checkpoint_runs(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    assert model.config.vocab_size == 201088
    ids = torch.tensor([200006, 17360, 200008, 12194, 200007, 200006])  # <|start|>system<|message|>...<|end|><|start|>
    kv = model.make_kv_cache({"full": 4, "sliding": 4}, 16)
    logits = model(ForwardBatch(ids, torch.arange(6), [6], [6], {"full": [[2]], "sliding": [[1]]}), kv)
    assert logits.shape == (1, 201088) and torch.isfinite(logits).all()
    assert logits.std() > 1.0 and logits.max() - logits.median() > 5.0


def test_bad_batches_raise_clear_errors(model):
    kv = model.make_kv_cache({"full": 4, "sliding": 4}, BLOCK)
    ids = _tokens(10, seed=9)

    def batch(**changes):
        fields = dict(token_ids=ids, positions=torch.arange(10), query_lens=[10], context_lens=[10],
                      block_tables={"full": [[0, 1]], "sliding": [[2, 3]]})
        fields.update(changes)
        return ForwardBatch(**fields)

    with pytest.raises(ValueError, match="token ids must lie in"):
        model(batch(token_ids=torch.full((10,), VOCAB)), kv)
    with pytest.raises(ValueError, match="covers 8 positions, needs 10"):
        model(batch(block_tables={"full": [[0]], "sliding": [[2, 3]]}), kv)
    with pytest.raises(ValueError, match="NO_BLOCK"):
        model(batch(block_tables={"full": [[0, 1]], "sliding": [[NO_BLOCK, 3]]}), kv)
    with pytest.raises(ValueError, match="query_lens sum to 9"):
        model(batch(query_lens=[9], context_lens=[9]), kv)
    with pytest.raises(ValueError, match="one 'sliding' block table per sequence"):
        model(batch(block_tables={"full": [[0, 1]]}), kv)


def test_packed_experts_give_the_same_logits(parity_path, model):
    packed = load_model(parity_path, keep_mxfp4=True)
    experts = packed.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and not hasattr(experts, "gate_up_proj")
    ids = _tokens(50, seed=11)
    assert torch.equal(_run_one_shot(packed, ids), _run_one_shot(model, ids))


def test_malformed_batches_are_rejected(model):
    kv = model.make_kv_cache({"full": 4, "sliding": 4}, BLOCK)
    tables = {"full": [[0, 1]], "sliding": [[2, 3]]}
    with pytest.raises(ValueError, match="no sequence"):
        model(ForwardBatch(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), [], [], {}), kv)
    with pytest.raises(ValueError, match="must both be"):
        model(ForwardBatch(_tokens(10, 1), torch.arange(9), [10], [10], tables), kv)
    with pytest.raises(ValueError, match="1 query_lens but 2 context_lens"):
        model(ForwardBatch(_tokens(10, 1), torch.arange(10), [10], [10, 3], tables), kv)
    with pytest.raises(ValueError, match="query_len <= context_len"):
        model(ForwardBatch(_tokens(10, 1), torch.arange(10), [10], [5], tables), kv)


def test_query_slicing_of_long_prefills_changes_nothing(model, monkeypatch):
    import services.worker.model.paged_attention as paged

    ids = _tokens(90, seed=12)
    whole = _run_one_shot(model, ids)
    monkeypatch.setattr(paged, "SCORE_ELEMENTS", 4 * 90 * 7)  # slices of 7 queries
    assert (_run_one_shot(model, ids) - whole).abs().max() <= 1e-5


@pytest.mark.gpu
def test_gpu_matches_cpu(parity_path, model):
    ids = _tokens(120, seed=13)
    expected = _run_one_shot(model, ids)
    on_gpu = load_model(parity_path, device="cuda", dtype=torch.float32)
    assert on_gpu.device.type == "cuda"
    got = _run_one_shot(on_gpu, ids.cuda())
    assert got.device.type == "cuda"
    # TF32 may be on for matmuls; the tolerance leaves room for it
    assert (got.cpu() - expected).abs().max() <= 5e-2
    packed = load_model(parity_path, device="cuda", dtype="bfloat16", keep_mxfp4=True)
    assert torch.isfinite(_run_one_shot(packed, ids.cuda())).all()
