"""The Hugging Face transformers reference: GptOssForCausalLM.generate on the same checkpoint and prompts.

Static batching, as `generate` does it: requests go in groups of `batch`, left-padded
to the group's longest prompt, and every row decodes for the group's longest output
(min_new_tokens = max_new_tokens, so no row stops at an end token). A row's own
output ends at its own length; the tokens past it are the cost of static batching.
Each step's time comes from a streamer, whose `put` runs after the step's tokens
reached the host.
"""

from __future__ import annotations

import time

import torch

from bench.streaming import RequestRecord


def load_hf_model(path: str, device: str, dtype: str):
    """GptOssForCausalLM from the checkpoint folder, experts dequantized by transformers."""
    import transformers

    kwargs = {"dtype": getattr(torch, dtype), "device_map": device}
    if hasattr(transformers, "Mxfp4Config"):
        # without the `kernels` hub package transformers can only dequantize; say so up front
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model


class _StepClock:
    """A generate() streamer that only notes when each put arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_records(model, prompts: list[list[int]], output_lens: list[int], batch: int,
                     pad_token_id: int) -> tuple[list[RequestRecord], float]:
    """Records of every prompt run in groups of `batch`, and the wall time of all groups (s)."""
    device = model.device
    records: list[RequestRecord] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch):
        group = prompts[first:first + batch]
        lens = output_lens[first:first + batch]
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, prompt in enumerate(group):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        clock = _StepClock()
        longest = max(lens)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           pad_token_id=pad_token_id, streamer=clock)
        steps = [t - t0 for t in clock.times[1:]]  # the first put is the prompt itself
        for prompt, wanted in zip(group, lens):
            mine = steps[:wanted]
            records.append(RequestRecord(
                prompt_tokens=len(prompt), requested_tokens=wanted, sent_at=t0, chunk_times=mine,
                chunk_tokens=[1] * len(mine), output_tokens=len(mine), latency=mine[-1] if mine else 0.0,
                finish_reason="length", error=None if len(mine) == wanted else f"generated {len(mine)} of {wanted} tokens",
            ))
    return records, time.perf_counter() - started
