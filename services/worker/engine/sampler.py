"""Turn one step's logits into tokens, request by request, with OpenAI/vLLM semantics.

Order per row: penalties (repetition over prompt and output, frequency and presence
over output) -> greedy argmax when temperature is 0 -> temperature -> top_k ->
top_p and min_p over what top_k kept -> a draw. Draws use the exponential race
(argmax of probs / Exp(1) noise) so a seeded request reads only its own generator:
the same seed gives the same tokens whatever else is in the batch.

Logprobs are the raw model's: log_softmax of the logits before penalties,
temperature and truncation (vLLM's default), so they do not depend on the sampling
params.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.worker.engine.errors import EngineInputError
from shared.protocol import SamplingParams

# Below this a temperature means greedy (as in vLLM): dividing by it overflows.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise EngineInputError naming the first sampling parameter out of range."""
    if not isinstance(params, SamplingParams):
        raise EngineInputError(f"params must be SamplingParams, got {type(params).__name__}")

    def number(name: str, *, integer: bool = False) -> float:
        value = getattr(params, name)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            raise EngineInputError(f"{name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
        return value

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise EngineInputError(message)

    need(number("max_tokens", integer=True) >= 1, f"max_tokens must be at least 1, got {params.max_tokens}")
    need(number("temperature") >= 0, f"temperature must be >= 0, got {params.temperature}")
    need(0 < number("top_p") <= 1, f"top_p must be in (0, 1], got {params.top_p}")
    need(number("top_k", integer=True) >= -1, f"top_k must be >= 0 (0 or -1: off), got {params.top_k}")
    need(0 <= number("min_p") <= 1, f"min_p must be in [0, 1], got {params.min_p}")
    need(number("repetition_penalty") > 0, f"repetition_penalty must be > 0, got {params.repetition_penalty}")
    need(-2 <= number("frequency_penalty") <= 2, f"frequency_penalty must be in [-2, 2], got {params.frequency_penalty}")
    need(-2 <= number("presence_penalty") <= 2, f"presence_penalty must be in [-2, 2], got {params.presence_penalty}")
    if params.seed is not None:
        number("seed", integer=True)
    need(isinstance(params.ignore_eos, bool), f"ignore_eos must be a boolean, got {params.ignore_eos!r}")
    need(isinstance(params.stop_token_ids, list), f"stop_token_ids must be a list, got {params.stop_token_ids!r}")
    for token in params.stop_token_ids:
        need(isinstance(token, int) and not isinstance(token, bool) and 0 <= token < vocab_size,
             f"stop_token_ids: {token!r} is not a token id of this model (0..{vocab_size - 1})")
    if params.logprobs is not None:
        need(0 <= number("logprobs", integer=True) <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {params.logprobs}")


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own random stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


@dataclass
class SampledTokens:
    """One token per row, with the raw model logprobs where a row asked for them."""

    token_ids: list[int]
    logprobs: list[float | None]  # of the chosen token; None where not asked
    top_logprobs: list[list[list] | None]  # [[token_id, logprob], ...] best first; None where not asked


@dataclass
class SamplingRow:
    """What the sampler needs to know of one sequence."""

    params: SamplingParams
    token_ids: list[int]  # prompt then output; read (sliced) only when a penalty needs it
    num_prompt_tokens: int
    generator: torch.Generator | None = None  # None: the engine's shared stream

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


def sample(logits: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None = None) -> SampledTokens:
    """Pick the next token of each row.

    logits: [rows, vocab] float32, the model's last-token logits.
    generator: the stream of rows without a seed.
    """
    logits = logits.float()
    raw_logprobs = _raw_logprobs(logits, rows)
    logits = _apply_penalties(logits.clone(), rows)

    temperatures = [r.params.temperature for r in rows]
    greedy = [t < GREEDY_TEMPERATURE for t in temperatures]
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if any(greedy):
        idx = torch.tensor([i for i, g in enumerate(greedy) if g], device=logits.device)
        chosen[idx] = logits[idx].argmax(dim=-1)
    drawn = [i for i, g in enumerate(greedy) if not g]
    if drawn:
        idx = torch.tensor(drawn, device=logits.device)
        temps = torch.tensor([temperatures[i] for i in drawn], dtype=logits.dtype, device=logits.device)
        scaled = _truncate(logits[idx] / temps[:, None], [rows[i].params for i in drawn])
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs)
        shared = [j for j, i in enumerate(drawn) if rows[i].generator is None]
        if shared:
            noise[shared] = torch.empty((len(shared), probs.shape[-1]), dtype=probs.dtype,
                                        device=probs.device).exponential_(generator=generator)
        for j, i in enumerate(drawn):
            if rows[i].generator is not None:  # a seeded row reads only its own stream
                noise[j].exponential_(generator=rows[i].generator)
        # An exact 0 draw would make 0/0 = NaN on a masked token, and argmax picks NaN.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        chosen[idx] = (probs / noise).argmax(dim=-1)

    token_ids = chosen.tolist()
    logprobs: list[float | None] = [None] * len(rows)
    top: list[list[list] | None] = [None] * len(rows)
    for i, row_logprobs in raw_logprobs.items():
        logprobs[i] = float(row_logprobs[token_ids[i]])
        n = rows[i].params.logprobs
        if n:
            values, ids = row_logprobs.topk(n)
            top[i] = [[int(t), float(v)] for t, v in zip(ids.tolist(), values.tolist())]
        else:
            top[i] = []
    return SampledTokens(token_ids=token_ids, logprobs=logprobs, top_logprobs=top)


def _raw_logprobs(logits: torch.Tensor, rows: list[SamplingRow]) -> dict[int, torch.Tensor]:
    """Row index -> [vocab] log_softmax of the model logits, for rows that asked."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return {}
    values = torch.log_softmax(logits[torch.tensor(wanted, device=logits.device)], dim=-1).cpu()
    return dict(zip(wanted, values))


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place on logits [rows, vocab]; touches only the ids a row has seen."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            # vLLM/HF: over prompt and output, shrink positive logits and grow negative ones.
            seen = torch.tensor(sorted(set(row.token_ids)), dtype=torch.long, device=logits.device)
            if seen.numel():
                values = logits[i, seen]
                logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and len(row.token_ids) > row.num_prompt_tokens:
            # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, over generated tokens.
            ids, counts = torch.tensor(row.output_ids, dtype=torch.long).unique(return_counts=True)
            ids, counts = ids.to(logits.device), counts.to(logits.device, logits.dtype)
            logits[i, ids] -= counts * p.frequency_penalty + p.presence_penalty
    return logits


def _truncate(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (-inf) tokens outside top_k, then outside top_p / below min_p of the rest.

    logits: [rows, vocab] float32, already divided by the temperature.
    """
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if not any(top_k) and all(v >= 1.0 for v in top_p) and not any(min_p):
        return logits
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([v if v else vocab for v in top_k], device=device)
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)
    # top_p: keep the smallest head whose mass reaches p (the token that crosses p stays).
    before = probs.cumsum(dim=-1) - probs
    drop = before > torch.tensor(top_p, dtype=probs.dtype, device=device)[:, None]
    # min_p: drop tokens less likely than min_p times the most likely one.
    drop |= probs < torch.tensor(min_p, dtype=probs.dtype, device=device)[:, None] * probs[:, :1]
    drop[:, 0] = False  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
