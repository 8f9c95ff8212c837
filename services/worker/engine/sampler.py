"""Turn one step's logits into tokens, request by request, with OpenAI/vLLM semantics.

Order per row: penalties (repetition over prompt and output, frequency and presence
over output) -> greedy argmax when temperature is 0 -> temperature -> top_k ->
top_p and min_p over what top_k kept -> a draw. A seeded request draws by the
exponential race (argmax of probs / Exp(1) noise, one draw per vocabulary column)
from its own generator: the same seed gives the same tokens whatever else is in the
batch. Requests without a seed draw from the engine's stream: on a GPU by the same race
(a few kernels), on the CPU by inverse CDF, one uniform per row (the same distribution
without 201k exponential draws per token). On a GPU a batch whose rows all are greedy or
draw from the engine's stream at a temperature skips both: FusedDraw (kernels/sample.py).

Logprobs are the raw model's: log_softmax of the logits before penalties,
temperature and truncation (vLLM's default), so they do not depend on the sampling
params.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from kernels.sample import gumbel_sample
from services.worker.engine.errors import EngineInputError
from services.worker.model.batch import to_device
from shared.protocol import SamplingParams

# Below this a temperature means greedy (as in vLLM): dividing by it overflows.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
CDF_CHUNK = 1024  # columns summed in order per row when drawing from the shared stream


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

    logits: [rows, vocab] float32, the model's last-token logits (not modified).
    generator: the stream of rows without a seed.
    """
    logits = logits.float()
    raw_logprobs = _raw_logprobs(logits, rows)
    token_ids = choose(logits, rows, generator).tolist()
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


def needs_host(params: SamplingParams) -> bool:
    """Whether sampling this request reads its token history or returns logprobs (host work).

    Penalties read the tokens so far, and logprobs come back as Python floats; other
    requests sample on the device alone (`choose`), so a step can launch before the
    tokens of the step before it reach the host.
    """
    return params.logprobs is not None or _penalized(params)


def choose(logits: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None = None) -> torch.Tensor:
    """The token of each row as [rows] int64 on logits' device, without waiting for the device.

    logits: [rows, vocab] float32 (not modified). Penalties read each row's token_ids.
    """
    logits = logits.float()
    if any(_penalized(r.params) for r in rows):
        logits = _apply_penalties(logits.clone(), rows)

    temperatures = [r.params.temperature for r in rows]
    greedy = [i for i, t in enumerate(temperatures) if t < GREEDY_TEMPERATURE]
    seeded = [i for i, t in enumerate(temperatures) if t >= GREEDY_TEMPERATURE and rows[i].generator is not None]
    shared = [i for i, t in enumerate(temperatures) if t >= GREEDY_TEMPERATURE and rows[i].generator is None]
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if greedy:
        _put(chosen, greedy, _rows(logits, greedy).argmax(dim=-1))
    if seeded:
        probs = torch.softmax(_scaled(logits, seeded, rows), dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(seeded):  # a seeded row reads only its own stream
            noise[j].exponential_(generator=rows[i].generator)
        _put(chosen, seeded, _race(probs, noise))
    if shared:
        if all(rows[i].params.temperature == 1.0 and not _truncates(rows[i].params) for i in shared):
            weights = torch.softmax(_rows(logits, shared), dim=-1)  # nothing to scale or mask: no copy first
        else:
            weights = torch.softmax(_scaled(logits, shared, rows), dim=-1)
        _put(chosen, shared, draw_shared(weights, generator))
    return chosen


class FusedDraw:
    """Draws on a GPU with kernels/sample.py when every row is greedy or takes the shared stream at a temperature.

    Those rows need no softmax: one Gumbel-max pass over the logits draws and checks
    them finite (two kernels, where the torch ops are nine). Rows with a seed, penalties
    or truncation go the torch way (`choose`). The per-row scale and noise are copied to
    the device once per batch composition.
    """

    def __init__(self, seed: int):
        self.seeds = random.Random(seed)  # the kernels' Philox seed per step: a seeded engine replays
        self._key: tuple | None = None
        self._params: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor | None:
        """[2, rows] int64 on the device: the draws (0 where a row is not finite) and the finite flags; None
        when some row needs the torch path."""
        if any(r.generator is not None or _penalized(r.params) or _truncates(r.params) for r in rows):
            return None
        key = tuple(r.params.temperature for r in rows)
        if key != self._key:
            scale = [1.0 if t < GREEDY_TEMPERATURE else 1.0 / t for t in key]
            noise = [0.0 if t < GREEDY_TEMPERATURE else 1.0 for t in key]
            self._params = to_device(torch.tensor([scale, noise], dtype=torch.float32), logits.device)
            self._key = key
        # 31 bits: the seed is always an int32 to Triton, so the kernel compiled at start is the one that runs
        return gumbel_sample(logits.float().contiguous(), self._params[0], self._params[1], self.seeds.getrandbits(31))


def draw_shared(weights: torch.Tensor, generator: torch.Generator | None, race: bool | None = None) -> torch.Tensor:
    """One draw per row of weights [rows, vocab] (probabilities) from the shared stream: [rows] int64.

    race (None: on a GPU) draws by the exponential race: four kernels whatever the vocabulary,
    where the inverse CDF launches some twenty small ones after every decode step. On the CPU
    the inverse CDF's one uniform a row beats 201k exponential draws. Both draw exactly from
    weights / sum.
    """
    if weights.is_cuda if race is None else race:
        noise = torch.empty_like(weights).exponential_(generator=generator)
        return _race(weights, noise)
    uniform = torch.rand(weights.shape[0], dtype=torch.float64, device=weights.device, generator=generator)
    return _inverse_cdf(weights, uniform)


def _race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax of probs / Exp(1) noise per row (consumes noise): a draw from probs. [rows] int64."""
    # An exact 0 draw would make 0/0 = NaN on a masked token, and argmax picks NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


def _raw_logprobs(logits: torch.Tensor, rows: list[SamplingRow]) -> dict[int, torch.Tensor]:
    """Row index -> [vocab] log_softmax of the model logits, for rows that asked."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return {}
    values = torch.log_softmax(logits[to_device(wanted, logits.device)], dim=-1).cpu()
    return dict(zip(wanted, values))


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place on logits [rows, vocab]; touches only the ids a row has seen."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            # vLLM/HF: over prompt and output, shrink positive logits and grow negative ones.
            seen = to_device(sorted(set(row.token_ids)), logits.device, torch.long)
            if seen.numel():
                values = logits[i, seen]
                logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and len(row.token_ids) > row.num_prompt_tokens:
            # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, over generated tokens.
            ids, counts = torch.tensor(row.output_ids, dtype=torch.long).unique(return_counts=True)
            ids, counts = ids.to(logits.device), counts.to(logits.device, logits.dtype)
            logits[i, ids] -= counts * p.frequency_penalty + p.presence_penalty
    return logits


def _penalized(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty or p.presence_penalty)


def _rows(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """logits[idx]; the tensor itself (no copy) when idx is every row in order."""
    if len(idx) == logits.shape[0]:
        return logits
    return logits[to_device(idx, logits.device)]


def _put(chosen: torch.Tensor, idx: list[int], values: torch.Tensor) -> None:
    if len(idx) == chosen.shape[0]:
        chosen.copy_(values)
    else:
        chosen[to_device(idx, chosen.device)] = values


def _scaled(logits: torch.Tensor, idx: list[int], rows: list[SamplingRow]) -> torch.Tensor:
    """A new [len(idx), vocab] float32: those rows over their temperature, truncated."""
    temps = to_device([rows[i].params.temperature for i in idx], logits.device, logits.dtype)
    return _truncate(_rows(logits, idx) / temps[:, None], [rows[i].params for i in idx])


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The column of each row where its cumulative weight passes uniform x the row's total.

    weights: [rows, vocab] float32 >= 0 (probabilities, normalised or not), each row
    with some positive weight; uniform: [rows] float64 in [0, 1). Returns [rows] int64.
    Exact sampling from weights / sum with one draw per row, in two levels: the row's
    chunk of CDF_CHUNK columns from the chunk totals, then the column inside that chunk
    from its running sum in float64.
    """
    n, vocab = weights.shape
    full = vocab // CDF_CHUNK
    totals = []
    if full:
        totals.append(weights.unfold(1, CDF_CHUNK, CDF_CHUNK).sum(dim=-1))  # [rows, full]
    if vocab > full * CDF_CHUNK:
        totals.append(weights[:, full * CDF_CHUNK:].sum(dim=-1, keepdim=True))
    chunk_totals = torch.cat(totals, dim=1).double()  # [rows, chunks]
    chunk_cdf = chunk_totals.cumsum(dim=1)
    total = chunk_cdf[:, -1]
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))  # under the last step
    chunk = torch.searchsorted(chunk_cdf, target[:, None], right=True).clamp_(max=chunk_cdf.shape[1] - 1)
    # where the draw falls inside its chunk, as a fraction of the chunk's total
    inside_chunk = (target - (chunk_cdf.gather(1, chunk).squeeze(1) - chunk_totals.gather(1, chunk).squeeze(1)))
    fraction = (inside_chunk / chunk_totals.gather(1, chunk).squeeze(1)).clamp_(0.0, 1.0)
    start = chunk.squeeze(1) * CDF_CHUNK
    columns = start[:, None] + torch.arange(CDF_CHUNK, device=weights.device)[None, :]
    cdf = weights.gather(1, columns.clamp(max=vocab - 1)).double().masked_fill_(columns >= vocab, 0.0).cumsum_(dim=1)
    last = cdf[:, -1]
    target = torch.minimum(fraction * last, torch.nextafter(last, torch.zeros_like(last)))
    return start + torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)


def _truncates(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0


def _truncate(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (-inf) tokens outside top_k, then outside top_p / below min_p, in the rows that ask.

    logits: [rows, vocab] float32, already divided by the temperature; returned, or a
    new tensor when some row truncates.
    """
    need = [j for j, p in enumerate(params) if _truncates(p)]
    if not need:
        return logits
    if len(need) == len(params):
        return _truncate_rows(logits, params)
    logits = logits.clone()
    idx = to_device(need, logits.device)
    logits[idx] = _truncate_rows(logits[idx], [params[j] for j in need])
    return logits


def _truncate_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """_truncate for rows that all ask for some truncation: a new tensor."""
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = to_device([v if v else vocab for v in top_k], device)
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)
    # top_p: keep the smallest head whose mass reaches p (the token that crosses p stays).
    before = probs.cumsum(dim=-1) - probs
    drop = before > to_device(top_p, device, probs.dtype)[:, None]
    # min_p: drop tokens less likely than min_p times the most likely one.
    drop |= probs < to_device(min_p, device, probs.dtype)[:, None] * probs[:, :1]
    drop[:, 0] = False  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
