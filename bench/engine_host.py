"""The engine's host work per decode step, apart from the model: scheduling, blocks, sampling, outputs.

    python -m bench.engine_host [--seqs 64,256] [--contexts 1024,8192] [--steps 100]

On a GPU the engine launches a step before it reads the last one's tokens, so its host work
hides behind the device's only while it is shorter. Here, on the CPU, B requests of P prompt
tokens are admitted and decoded for --steps steps through Engine.step with a model that
computes nothing (the gpt-oss-20b config's layers and window; uniform logits over a 1024-token
vocabulary; a cache of one value per token): what is timed is the engine's own Python per step,
and how it grows with the batch and the context.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from services.worker.engine.engine import Engine
from services.worker.model.batch import ForwardBatch, PagedKVCache
from services.worker.model.make_checkpoint import preset_config
from shared.protocol import SamplingParams

BLOCK = 16


class LogitsOnly(torch.nn.Module):
    """The engine's model interface and nothing behind it: uniform logits, a one-value-a-token cache."""

    def __init__(self, config):
        super().__init__()
        self.config, self.device = config, torch.device("cpu")

    def make_kv_cache(self, num_blocks: dict[str, int], block_size: int) -> PagedKVCache:
        return PagedKVCache.allocate(self.config.layer_groups, num_blocks, block_size, 1, 1, torch.float32, self.device)

    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        return torch.zeros(batch.num_seqs, self.config.vocab_size)


def ms_per_step(seqs: int, context: int, steps: int, seed: int = 0) -> float:
    """Wall ms of one decode step of `seqs` sequences that hold `context` tokens."""
    model = LogitsOnly(preset_config("20b", vocab_size=1024))
    engine = Engine(model, num_blocks=seqs * ((context + steps) // BLOCK + 4), block_size=BLOCK, max_num_seqs=seqs,
                    max_num_batched_tokens=seqs * context + BLOCK, max_model_len=context + steps + BLOCK,
                    eos_token_ids=[], seed=seed)
    rng = random.Random(seed)
    for i in range(seqs):
        engine.add_request(f"r{i}", [rng.randrange(1024) for _ in range(context)],
                           SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=1.0))
    for _ in range(3):  # the prefill, then two decode steps
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return 1000 * (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="64,256")
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| sequences | context | engine ms a step |\n| --- | --- | --- |")
    for seqs in (int(s) for s in args.seqs.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            print(f"| {seqs} | {context} | {ms_per_step(seqs, context, args.steps):.2f} |", flush=True)


if __name__ == "__main__":
    main()
