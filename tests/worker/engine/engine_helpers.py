"""Shared helpers of the engine tests: prompts, params, running an engine, the reference run."""

from __future__ import annotations

import random

from services.worker.engine.engine import Engine
from shared.protocol import SamplingParams

VOCAB = 1024
WINDOW = 16
MAX_MODEL_LEN = 128


def assert_all_blocks_free(engine: Engine) -> None:
    assert not engine.requests, f"requests left in the engine: {sorted(engine.requests)}"
    for group, pool in engine.blocks.pools.items():
        held = [b.block_id for b in pool.blocks if b.ref_count]
        assert not held and pool.num_free == pool.num_total, f"{group} blocks still held: {held}"


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def greedy(max_tokens: int = 10, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


class Result:
    """Everything a request produced, merged over its outputs."""

    def __init__(self):
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.outputs = []

    def add(self, out) -> None:
        self.outputs.append(out)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs

    @property
    def last(self):
        return self.outputs[-1]


def run_all(engine: Engine, results: dict[str, Result] | None = None, max_steps: int = 0) -> dict[str, Result]:
    """Step until the engine is idle (or max_steps steps); the merged output of every request."""
    results = {} if results is None else results
    steps = 0
    while engine.has_work() and (not max_steps or steps < max_steps):
        for out in engine.step():
            results.setdefault(out.request_id, Result()).add(out)
        steps += 1
        assert steps < 10_000, "the engine did not finish its work"
    return results


def generate_contiguous(model, token_ids: list[int], params: SamplingParams) -> Result:
    """The reference: one request alone in one contiguous cache block, prefilled in one shot."""
    engine = Engine(model, num_blocks=1, block_size=MAX_MODEL_LEN, max_num_seqs=1,
                    max_num_batched_tokens=MAX_MODEL_LEN, max_model_len=MAX_MODEL_LEN, seed=0)
    engine.add_request("reference", token_ids, params)
    result = run_all(engine)["reference"]
    assert_all_blocks_free(engine)
    return result
