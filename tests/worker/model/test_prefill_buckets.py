"""The prefill graphs' token buckets (services/worker/model/cuda_prefill_graphs.py; the graphs need a GPU)."""

from services.worker.model.cuda_prefill_graphs import MAX_GRAPH_TOKENS, prefill_buckets


def test_buckets_cover_the_budget_with_bounded_padding():
    buckets = prefill_buckets(2048)
    assert buckets[0] == 128 and buckets[-1] == 2048 and list(buckets) == sorted(set(buckets))
    for tokens in range(1, 2049):
        bucket = next(b for b in buckets if b >= tokens)
        assert bucket - tokens < (128 if tokens <= 1024 else 256), tokens


def test_a_budget_between_buckets_gets_the_next_one_and_a_large_one_stops_at_the_cap():
    assert prefill_buckets(1000)[-1] == 1024
    assert prefill_buckets(100) == (128,)
    assert prefill_buckets(1 << 20)[-1] == MAX_GRAPH_TOKENS
