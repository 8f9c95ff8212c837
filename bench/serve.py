"""Serving benchmark: load on the gateway's OpenAI API, the same prompts through references, a roofline.

    python -m bench.serve [--workloads random:1024:1024,sharegpt] [--concurrency 1,4,16,64,256]
                          [--request-rate 2,8] [--references engine,hf] [--goodput ttft:500 tpot:50]
                          [--base-url http://host:8000] [rose settings: --model --device --backend ...]

Workloads: `random:IN:OUT` sends token-id prompts of exactly IN tokens (uniform
random ids from the o200k ordinary range) asking for OUT tokens; `random:IN:OUT:SHARED`
opens every prompt of a level with the same SHARED tokens (a system prompt: the prefix
cache serves them after the first request); `sharegpt` draws per-request lengths from
lognormal fits to ShareGPT's conversation lengths (input median 180, output median 200
tokens, sigma 1; seeded, generated here: no dataset is downloaded), clipped to half the
context or to `sharegpt:MAX_IN:MAX_OUT`. Every request streams through POST
/v1/completions with ignore_eos, so outputs run to max_tokens: Harmony's stop ids
(<|return|>, <|call|>, <|endoftext|>) do not end them, in the mesh's formatter or the
in-process engine; the report counts the tokens really generated (usage) either way.

Load: a fixed concurrency (closed loop: a new request as soon as one ends) or a
Poisson request rate (`--request-rate`, optionally capped by --max-concurrency).
Each (workload, level) gets its own prompts, so the prefix cache never helps across
levels, and the same prompts go through each target (a repeat pass through the same
mesh, --mesh-repeats, redraws their token ids at the same lengths: its cache holds
the first pass's prompts):
- mesh: a rose mesh started here with services.launcher (or --base-url);
- engine: AsyncEngine in this process, same settings, no mesh (what the mesh costs);
- hf: transformers' GptOssForCausalLM.generate, static batches of the concurrency.
Metrics per run: TTFT, TPOT, ITL, E2E latency (mean, p50, p90, p99), requests/s,
output tokens/s, goodput under the SLOs, and request-level efficiency (tokens
really generated per token asked for, requests/s counted in full-length requests,
the per-request stream speed, the cost of one output token at that load). Next to
each level: the memory-bound decode limit of the checkpoint at that batch
(bench.roofline) over the copy bandwidth measured in this run.

Writes <out>/serve.json and <out>/serve.png and prints one table per workload and
the ours/reference ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np

from bench import serve_resume
from bench.gpu_monitor import GpuMonitor
from bench.roofline import copy_bandwidth, decode_bound
from bench.streaming import RequestRecord, stream_completion, stream_engine
from shared.config import Settings

ORDINARY_TOKENS = 199998  # o200k ranks below the special tokens
SHAREGPT_INPUT_MEDIAN, SHAREGPT_OUTPUT_MEDIAN, SHAREGPT_SIGMA = 180, 200, 1.0
PERCENTILES = (50, 90, 99)
TARGETS = ("mesh", "engine", "hf")
MESH_FAILED = 3  # exit status when the mesh does not start (bench/gpu_serve.sh then tries another backend)
DEFAULT_RATE_CONCURRENCY = 64  # streams the warm-up reaches in rate mode without --max-concurrency


# ---------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    input_len: int | None  # None: drawn per request (sharegpt)
    output_len: int | None
    caps: tuple[int, int] | None = None  # sharegpt: longest input and output drawn
    shared_prefix: int = 0  # random:IN:OUT:SHARED: every prompt of a level opens with the same SHARED tokens

    @classmethod
    def parse(cls, spec: str, max_len: int) -> "Workload":
        parts = spec.split(":")
        if parts[0] == "random" and len(parts) in (3, 4):
            shared = int(parts[3]) if len(parts) == 4 else 0
            if not 0 <= shared < int(parts[1]):
                raise ValueError(f"workload {spec!r}: the shared prefix must be shorter than the prompt")
            return cls(f"random-{parts[1]}-{parts[2]}" + (f"-shared{shared}" if shared else ""), int(parts[1]),
                       int(parts[2]), shared_prefix=shared)
        if parts[0] == "sharegpt" and len(parts) in (1, 3):
            caps = (int(parts[1]), int(parts[2])) if len(parts) == 3 else (max_len // 2, max_len // 2)
            return cls("sharegpt" + (f"-{caps[0]}-{caps[1]}" if len(parts) == 3 else ""), None, None, caps)
        raise ValueError(f"unknown workload {spec!r}: use random:IN:OUT, random:IN:OUT:SHARED, sharegpt or "
                         "sharegpt:MAX_IN:MAX_OUT")

    def requests(self, count: int, rng: np.random.Generator, max_len: int) -> list[tuple[list[int], int]]:
        """(prompt token ids, max_tokens) for `count` requests; lengths clipped to max_len."""
        if self.input_len is None:
            ins = np.exp(rng.normal(math.log(SHAREGPT_INPUT_MEDIAN), SHAREGPT_SIGMA, count))
            outs = np.exp(rng.normal(math.log(SHAREGPT_OUTPUT_MEDIAN), SHAREGPT_SIGMA, count))
            lens = [(int(np.clip(i, 4, self.caps[0])), int(np.clip(o, 4, self.caps[1]))) for i, o in zip(ins, outs)]
        else:
            lens = [(self.input_len, self.output_len)] * count
        return self.prompts(lens, rng)

    def prompts(self, lens: list[tuple[int, int]], rng: np.random.Generator) -> list[tuple[list[int], int]]:
        """Token ids for these (input, output) lengths: uniform ordinary ids after the shared prefix."""
        shared = rng.integers(0, ORDINARY_TOKENS, self.shared_prefix).tolist()
        return [(shared + rng.integers(0, ORDINARY_TOKENS, n_in - len(shared)).tolist(), n_out) for n_in, n_out in lens]


@dataclass(frozen=True)
class Level:
    concurrency: int | None  # None: unbounded (rate mode)
    request_rate: float | None  # None: closed loop

    @property
    def label(self) -> str:
        if self.request_rate is None:
            return f"c={self.concurrency}"
        cap = f",c<={self.concurrency}" if self.concurrency else ""
        return f"rate={self.request_rate:g}/s{cap}"

    @property
    def batch(self) -> int:
        """The batch the roofline and the HF reference assume at this level."""
        return self.concurrency or 1


# ---------------------------------------------------------------- load generation
async def drive(send, items: list[tuple[list[int], int]], level: Level, seed: int) -> tuple[list[RequestRecord], float]:
    """Run every item through `send(index, prompt, max_tokens)` at this level; (records, wall s)."""
    gate = asyncio.Semaphore(level.concurrency) if level.concurrency else None
    rng = random.Random(seed)

    async def one(i: int, prompt: list[int], max_tokens: int) -> RequestRecord:
        if gate is None:
            return await send(i, prompt, max_tokens)
        async with gate:
            return await send(i, prompt, max_tokens)

    start = time.perf_counter()
    tasks = []
    for i, (prompt, max_tokens) in enumerate(items):
        if level.request_rate is not None and i:
            await asyncio.sleep(rng.expovariate(level.request_rate))
        tasks.append(asyncio.ensure_future(one(i, prompt, max_tokens)))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - start


# ---------------------------------------------------------------- metrics
def _stats(values: list[float], scale: float = 1000.0) -> dict:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float) * scale
    if not arr.size:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def summarize(records: list[RequestRecord], duration: float, slo_ms: dict[str, float],
              decoded_tokens: int | None = None) -> dict:
    """The run's metrics (times in ms); decoded_tokens: tokens the target computed, when known."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    requested = sum(r.requested_tokens for r in records)
    tpots = [r.tpot for r in ok if r.tpot is not None]
    good = [r for r in ok if all(_metric_ms(r, name) <= limit for name, limit in slo_ms.items())]
    summary = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration,
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "cached_input_tokens": sum(r.cached_tokens for r in ok),  # from the prefix cache: prefill skipped
        "output_tokens": out_tokens,
        "requested_output_tokens": requested,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([gap for r in ok for gap in r.itls]),
        "e2el_ms": _stats([r.latency for r in ok]),
        "slo_ms": slo_ms,
        "goodput": len(good) / duration,
        "goodput_fraction": len(good) / len(records) if records else 0.0,
        "efficiency": {
            "generated_fraction": out_tokens / requested if requested else 0.0,
            "full_length_requests_per_s": out_tokens / (requested / len(records)) / duration if requested else 0.0,
            "per_request_tokens_per_s": float(np.mean([r.output_tokens / r.latency for r in ok])) if ok else 0.0,
            "ms_per_output_token": 1000 * duration / out_tokens if out_tokens else None,
            "useful_decode_fraction": out_tokens / decoded_tokens if decoded_tokens else None,
        },
        "ttft_stages_ms": {name: _stats([r.ttft_stages[name] for r in ok if name in r.ttft_stages], 1.0)
                           for name in dict.fromkeys(k for r in ok for k in r.ttft_stages)},
        "finish_reasons": {k: sum(1 for r in records if str(r.finish_reason) == k)
                           for k in sorted({str(r.finish_reason) for r in records})},
    }
    return summary


def _metric_ms(record: RequestRecord, name: str) -> float:
    value = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.latency}[name]
    return 1000 * value


def record_dict(r: RequestRecord) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens, "requested_tokens": r.requested_tokens,
            "output_tokens": r.output_tokens,
            "streamed_tokens": r.streamed_tokens, "chunks": len(r.chunk_times), "ttft_ms": 1000 * r.ttft if r.chunk_times else None,
            "latency_ms": 1000 * r.latency, "finish_reason": r.finish_reason, "error": r.error,
            "request_id": r.request_id, "ttft_stages_ms": r.ttft_stages or None}


# ---------------------------------------------------------------- targets
def run_mesh(args, settings: Settings, plan: list[dict]) -> None:
    """Every planned level through the mesh's gateway (started here unless --base-url)."""
    import httpx

    mesh = None
    base_url = args.base_url
    if base_url is None:
        from services.launcher import Mesh, with_free_ports

        log_dir = os.path.join(args.out, "mesh-logs")
        env = {}
        if args.trace:  # every service prints its spans into its log (bench.mesh_trace), the worker its steps
            settings = dataclasses.replace(settings, otel_exporter="console")
            env["ROSE_STEP_LOG"] = _fresh(os.path.join(log_dir, "steps-worker.jsonl"))
        mesh = Mesh(with_free_ports(settings), formatters=args.formatters, workers=args.workers, log_dir=log_dir,
                    env=env)
        print(f"mesh: starting {args.workers} worker(s), {args.formatters} formatter(s), backend {settings.backend} "
              f"on {settings.device} (logs in {log_dir})", file=sys.stderr)
        mesh.start(args.ready_timeout)
        base_url = mesh.url
    try:
        async def sweep():
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
                model = (await http.get("/v1/models")).json()["data"][0]["id"]

            async def send(i, prompt, max_tokens):
                return await stream_completion(base_url, model, prompt, max_tokens, stream_logprobs=args.stream_logprobs)

            await warm_up(send, plan)
            for repeat, target in enumerate(mesh_targets(args)):  # a second pass shows how far the figures move
                for entry in plan:
                    if serve_resume.done_before(target, entry) or out_of_time(args, target, entry):
                        continue
                    # the mesh's prefix cache holds the first pass's prompts: a repeat redraws their ids
                    items = entry["items"] if repeat == 0 else entry["workload"].prompts(
                        [(len(p), n) for p, n in entry["items"]],
                        level_rng(args.seed, entry["workload"], entry["level"], repeat))
                    start = time.monotonic()
                    records, duration = await drive(send, items, entry["level"], args.seed)
                    entry["runs"][target] = (records, duration, None)
                    entry.setdefault("windows", {})[target] = (start, time.monotonic())
                    _ran(args, target, entry, records, duration)

        asyncio.run(sweep())
    finally:
        if mesh is not None:
            crashed = [mesh.describe_crash(c) for c in mesh.crashed()]
            mesh.stop()  # the services flush their spans as they stop
            if crashed:
                print("mesh children crashed:\n" + "\n".join(crashed), file=sys.stderr)
            if args.trace:
                add_mesh_stages(plan, log_dir)
                add_step_summaries(plan, "mesh", os.path.join(log_dir, "steps-worker.jsonl"))


def _fresh(path: str) -> str:
    """path, with no file left there by an earlier run."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    return path


def add_step_summaries(plan: list[dict], prefix: str, path: str) -> None:
    """What the engine's steps held during each run of the targets starting with `prefix` (bench.step_log)."""
    from bench.step_log import read, summary

    steps = read(path)
    for entry in plan:
        for target, window in entry.get("windows", {}).items():
            if target.startswith(prefix):
                entry.setdefault("steps", {})[target] = summary(steps, *window)


def add_mesh_stages(plan: list[dict], log_dir: str) -> None:
    """Each mesh request's TTFT stages from the services' spans, and the client's own share."""
    from bench.mesh_trace import ttft_stages

    stages = ttft_stages(log_dir)
    for entry in plan:
        for target, (records, _, _) in entry["runs"].items():
            for r in records:
                found = stages.get(r.request_id) if target.startswith("mesh") and r.ok else None
                if found:
                    r.ttft_stages = {k: v for k, v in found.items() if k != "gateway ttft"}
                    r.ttft_stages["client and HTTP"] = 1000 * r.ttft - found["gateway ttft"]


def engine_request_params(max_tokens: int, stop_token_ids: list[int]):
    """The in-process engine's SamplingParams for a request: what the formatter makes of the body the mesh's
    requests carry (bench.streaming.stream_completion: ignore_eos, so Harmony's stop ids do not stop it)."""
    from services.formatter.request import sampling_params

    return sampling_params({"max_tokens": max_tokens, "ignore_eos": True}, "completions", stop_token_ids, max_tokens)


def run_engine(args, settings: Settings, plan: list[dict], stop_token_ids: list[int]) -> None:
    """Every planned level through AsyncEngine in this process (the same settings as the worker)."""
    from services.worker.engine import AsyncEngine, Engine

    step_log = _fresh(os.path.join(args.out, "steps-engine.jsonl")) if args.trace else None
    if step_log:
        os.environ["ROSE_STEP_LOG"] = step_log
    try:
        engine = AsyncEngine(Engine.from_settings(settings))
    finally:
        os.environ.pop("ROSE_STEP_LOG", None)
    counter = iter(range(10**9))

    async def send(i, prompt, max_tokens):
        params = engine_request_params(max_tokens, stop_token_ids)
        return await stream_engine(engine, f"bench-{next(counter)}", prompt, params)

    async def sweep():
        await warm_up(send, plan)
        for entry in plan:
            if serve_resume.done_before("engine", entry) or out_of_time(args, "engine", entry):
                continue
            before, start = engine.stats(), time.monotonic()
            records, duration = await drive(send, entry["items"], entry["level"], args.seed)
            after = engine.stats()
            entry["runs"]["engine"] = (records, duration, after.generated_tokens - before.generated_tokens)
            entry.setdefault("windows", {})["engine"] = (start, time.monotonic())
            _ran(args, "engine", entry, records, duration)

    try:
        asyncio.run(sweep())
    finally:
        engine.shutdown()
        if step_log:
            add_step_summaries(plan, "engine", step_log)
        del engine
        _free_device_memory()


def run_hf(args, settings: Settings, plan: list[dict]) -> None:
    """Closed-loop levels through transformers' generate (static batches of the concurrency)."""
    import torch

    from bench.hf_reference import generate_records, load_hf_model

    model = load_hf_model(settings.model_path, settings.device, settings.dtype)
    pad = model.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else 0
    generate_records(model, [p for p, _ in warmup_items()], [n for _, n in warmup_items()], 2, pad)
    for entry in plan:
        level = entry["level"]
        if level.request_rate is not None or serve_resume.done_before("hf", entry) or out_of_time(args, "hf", entry):
            continue  # static batches have no arrival process to follow
        if args.hf_max_batch and level.batch > args.hf_max_batch:
            # one generate() call cannot be split across parts: a batch that decodes longer than a device call
            # would lose the whole part, so such levels are left out (and stay in meta.missing)
            entry.setdefault("skipped", []).append("hf")
            print(f"  hf     {entry['workload'].name} {level.label}: skipped (batch {level.batch} > --hf-max-batch)",
                  file=sys.stderr)
            continue
        items = entry["items"][: args.hf_batches * level.batch] if args.hf_batches else entry["items"]
        start = time.monotonic()
        try:
            records, duration = generate_records(model, [p for p, _ in items], [n for _, n in items], level.batch, pad)
            groups = [items[i:i + level.batch] for i in range(0, len(items), level.batch)]
            decoded = sum(len(g) * max(n for _, n in g) for g in groups)
        except torch.OutOfMemoryError as exc:  # transformers' eager attention at long prompts and many streams:
            # the level's requests fail (a run the report keeps, so a --resume part does not try it again)
            _free_device_memory()
            error = "OutOfMemoryError: " + str(exc).splitlines()[0]
            records = [RequestRecord(prompt_tokens=len(p), requested_tokens=n, error=error) for p, n in items]
            duration, decoded = time.monotonic() - start, None
        entry.setdefault("windows", {})["hf"] = (start, time.monotonic())
        entry["runs"]["hf"] = (records, duration, decoded)
        _ran(args, "hf", entry, records, duration)
    del model
    _free_device_memory()


def mesh_targets(args) -> list[str]:
    """The mesh's passes: mesh, then mesh#2 .. mesh#N (--mesh-repeats)."""
    return ["mesh"] + [f"mesh#{i}" for i in range(2, args.mesh_repeats + 1)]


def out_of_time(args, target: str, entry: dict) -> bool:
    """True (and the level noted as skipped) once --deadline-s has passed."""
    if time.monotonic() < args.deadline:
        return False
    entry.setdefault("skipped", []).append(target)
    print(f"  {target:6s} {entry['workload'].name} {entry['level'].label}: skipped (--deadline-s passed)", file=sys.stderr)
    return True


def warmup_items(count: int = 2) -> list[tuple[list[int], int]]:
    return [(list(range(1000 + 17 * i, 1016 + 17 * i)), 4) for i in range(count)]


async def warm_up(send, plan: list[dict]) -> None:
    """Short requests at 1, 2, 4, ... concurrent streams up to the plan's largest level.

    The cuda backend captures a decode step's CUDA graph the first time a batch size
    bucket (1, 2, 4, ... 256) is used, a pause of up to seconds that must not land in a
    measured level (a first run's 8-stream level, TTFT p99 1.9 s, came out 17% below a
    second run's).
    """
    top = max((e["level"].concurrency or DEFAULT_RATE_CONCURRENCY) for e in plan)
    streams = 1
    while True:
        await drive(send, warmup_items(streams), Level(streams, None), 0)
        if streams >= top:
            return
        streams = min(2 * streams, top)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ran(args, target: str, entry: dict, records: list[RequestRecord], duration: float) -> None:
    """A run ended: its line on stderr, and the report rewritten, so a command cut short keeps every run that ended."""
    tokens = sum(r.output_tokens for r in records if r.ok)
    failed = sum(1 for r in records if not r.ok)
    cached = sum(r.cached_tokens for r in records if r.ok)
    print(f"  {target:6s} {entry['workload'].name} {entry['level'].label}: {len(records)} requests, "
          f"{tokens / duration:.1f} output tok/s, {failed} failed, {duration:.1f}s"
          + (f", {cached} prompt tokens from the prefix cache" if cached else ""), file=sys.stderr)
    if getattr(args, "save_report", None) is not None:
        args.save_report()


# ---------------------------------------------------------------- report
RATIO_KEYS = (("output_throughput", None), ("request_throughput", None), ("ttft_ms", "p50"), ("tpot_ms", "p50"),
              ("itl_ms", "p50"), ("e2el_ms", "p50"))


def ratios(ours: dict, reference: dict) -> dict:
    """ours / reference for throughputs and median latencies (None where undefined)."""
    out = {}
    for key, sub in RATIO_KEYS:
        a, b = ours[key], reference[key]
        if sub:
            a, b = a[sub], b[sub]
        out[key + (f"_{sub}" if sub else "")] = a / b if a is not None and b else None
    return out


def build_report(args, settings: Settings, plan: list[dict], bandwidth: float, config, kv_itemsize: int) -> dict:
    workloads = {}
    for entry in plan:
        wl, level = entry["workload"], entry["level"]
        items = entry["items"]
        context = int(np.mean([len(p) + n / 2 for p, n in items]))  # mean context over a decode
        block = workloads.setdefault(wl.name, {
            "workload": dataclasses.asdict(wl),
            "roofline_batch1": decode_bound(config, bandwidth, 1, context, kv_itemsize).as_dict(),
            "levels": [],
        })
        runs = dict(entry.get("prior", {}))  # --resume: what earlier parts ran
        for target, (records, duration, decoded) in entry["runs"].items():
            summary = summarize(records, duration, args.slo_ms, decoded)
            summary["requests"] = [record_dict(r) for r in records]
            window = entry.get("windows", {}).get(target)
            if window and getattr(args, "gpu_monitor", None):  # bench.gpu_monitor: clocks, power, heat
                summary["gpu"] = args.gpu_monitor.summary(*window)
            runs[target] = summary
        bound = decode_bound(config, bandwidth, level.batch, context, kv_itemsize)
        level_out = {
            "concurrency": level.concurrency,
            "request_rate": level.request_rate,
            "label": level.label,
            "num_prompts": len(items),
            "roofline": bound.as_dict(),
            "runs": runs,
            "skipped": entry.get("skipped", []),
            "steps": {**entry.get("prior_steps", {}), **entry.get("steps", {})},  # bench.step_log (--trace)
            "ratios": {},
        }
        for ours in ("mesh", "engine"):
            for ref in TARGETS[TARGETS.index(ours) + 1:]:
                if ours in runs and ref in runs:
                    level_out["ratios"][f"{ours}/{ref}"] = ratios(runs[ours], runs[ref])
        for repeat in (t for t in runs if t.startswith("mesh#") and "mesh" in runs):  # run to run
            level_out["ratios"][f"{repeat}/mesh"] = ratios(runs[repeat], runs["mesh"])
        block["levels"].append(level_out)
    meta = run_meta(args, settings, config)
    if args.resume:
        meta["parts"] = serve_resume.parts(args.prior, meta)
    targets = mesh_targets(args) + [r for r in args.references.split(",") if r]
    meta["missing"] = serve_resume.missing(plan, targets)  # what a --resume part would still run
    return {
        "meta": meta,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "workloads": list(workloads.values()),
    }


def run_meta(args, settings: Settings, config) -> dict:
    import torch

    if settings.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return {
        "date": args.started,
        "commit": args.commit,
        "command": "python -m bench.serve " + " ".join(args.argv),
        "device": device,
        "torch": torch.__version__,
        "model": settings.model_path,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "experts": config.num_local_experts,
        "backend": settings.backend,
        "torch_device": settings.device,
        "dtype": settings.dtype,
        "max_num_seqs": settings.max_num_seqs,
    }


def git_commit() -> str:
    """The checkout's short commit, "+dirty" when bench/ or services/ has uncommitted changes.

    ROSE_COMMIT overrides it where the tree is not its .git's (the device tool copies the working tree
    over the .git of an older one).
    """
    if os.environ.get("ROSE_COMMIT"):
        return os.environ["ROSE_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                                check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench", "services", "shared"], capture_output=True,
                               text=True, cwd=root, check=False).stdout.strip()
    except OSError:
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _side_table(title: str, head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A markdown table under its title, printed only when it has rows."""
    if rows:
        print(f"\n{title}")
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")


def print_tables(report: dict) -> None:
    print(f"\n{report['meta']['device']} | {report['meta']['model']} ({report['meta']['layers']} layers) | "
          f"backend {report['meta']['backend']} on {report['meta']['torch_device']} | copy bandwidth "
          f"{report['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    for wl in report["workloads"]:
        b1 = wl["roofline_batch1"]
        print(f"\n## {wl['workload']['name']}  (batch-1 decode bound: {1000 * b1['step_s']:.3f} ms/token, "
              f"{b1['tokens_per_s']:.0f} tok/s; {(b1['weight_bytes'] + b1['kv_bytes']) / 2**20:.1f} MiB read per token)")
        head = ("target", "level", "ok/fail", "req/s", "out tok/s", "roofline tok/s", "TTFT p50/p99 ms",
                "TPOT p50/p99 ms", "ITL p50/p99 ms", "goodput req/s", "generated/asked", "useful/decoded", "tok/s per req")
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for level in wl["levels"]:
            for target, s in level["runs"].items():
                row = (target, level["label"], f"{s['completed']}/{s['failed']}", _fmt(s["request_throughput"], 2),
                       _fmt(s["output_throughput"]), _fmt(level["roofline"]["tokens_per_s"], 0),
                       f"{_fmt(s['ttft_ms']['p50'])}/{_fmt(s['ttft_ms']['p99'])}",
                       f"{_fmt(s['tpot_ms']['p50'], 2)}/{_fmt(s['tpot_ms']['p99'], 2)}",
                       f"{_fmt(s['itl_ms']['p50'], 2)}/{_fmt(s['itl_ms']['p99'], 2)}", _fmt(s["goodput"], 2),
                       _fmt(s["efficiency"]["generated_fraction"], 3), _fmt(s["efficiency"]["useful_decode_fraction"], 3),
                       _fmt(s["efficiency"]["per_request_tokens_per_s"]))
                print("| " + " | ".join(row) + " |")
        for level in wl["levels"]:
            if level["concurrency"] != 1:
                continue
            for target, s in level["runs"].items():
                tpot = s["tpot_ms"]["p50"]
                if tpot:  # the roofline bounds decode; a request's output rate also carries its prefill
                    print(f"batch-1 decode, {target}: {1000 / tpot:.1f} tok/s from TPOT p50 = "
                          f"{100000 / tpot / b1['tokens_per_s']:.1f}% of the roofline; output {s['output_throughput']:.1f} "
                          f"tok/s with prefill = {100 * s['output_throughput'] / b1['tokens_per_s']:.1f}%")
        staged = [(level["label"], target, s["ttft_stages_ms"]) for level in wl["levels"]
                  for target, s in level["runs"].items() if s.get("ttft_stages_ms")]
        names = list(dict.fromkeys(n for _, _, st in staged for n in st))
        _side_table("TTFT by stage, p50 / mean ms (bench.mesh_trace; the stages' p50s need not add up to TTFT's)",
                    ("target", "level", *names),
                    [(target, label, *(f"{_fmt(st[n]['p50'], 2)} / {_fmt(st[n]['mean'], 2)}" if n in st else "-"
                                       for n in names)) for label, target, st in staged])
        _side_table("Engine steps while each run went (bench.step_log; means per step)",
                    ("target", "level", "steps", "period ms", "decode rows", "prompt tokens", "steps starting prompts",
                     "prompts a start", "waiting"),
                    [(target, level["label"], str(st["steps"]), f"{st['period_ms']:.2f}", f"{st['decode_rows']:.1f}",
                      f"{st['prompt_tokens']:.0f}", f"{100 * st['starting_share']:.0f}%", f"{st['prompts_per_start']:.2f}",
                      f"{st['waiting']:.1f}")
                     for level in wl["levels"] for target, st in level.get("steps", {}).items() if st])
        _side_table("The GPU while each run went (bench.gpu_monitor, nvidia-smi every 0.5 s)",
                    ("target", "level", "SM MHz mean / min", "mem MHz", "temp max C", "power mean / max W", "slowed",
                     "reasons"),
                    [(target, level["label"], f"{g['sm_mhz_mean']:.0f} / {g['sm_mhz_min']:.0f}", f"{g['mem_mhz_mean']:.0f}",
                      f"{g['temp_c_max']:.0f}", f"{g['power_w_mean']:.0f} / {g['power_w_max']:.0f}",
                      f"{100 * g['slowed_share']:.0f}%", ", ".join(g["slowdowns"]) or "-")
                     for level in wl["levels"] for target, s in level["runs"].items() if (g := s.get("gpu"))])
        if any(level["ratios"] for level in wl["levels"]):
            print("ratios are ours/reference: above 1 is better for throughputs, worse for latencies")
        for level in wl["levels"]:
            for pair, r in level["ratios"].items():
                parts = ", ".join(f"{k} {_fmt(v, 2)}x" for k, v in r.items())
                print(f"ratio {pair} at {level['label']}: {parts}")


def plot(report: dict, path: str) -> None:
    """Output tokens/s against median TPOT per target, one panel per workload, roofline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    workloads = report["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.5), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        levels = wl["levels"]
        roof = [(1000 * lv["roofline"]["step_s"], lv["roofline"]["tokens_per_s"]) for lv in levels]
        ax.plot([x for x, _ in roof], [y for _, y in roof], "k--", label="memory-bound roofline")
        b1 = wl["roofline_batch1"]
        ax.plot([1000 * b1["step_s"]], [b1["tokens_per_s"]], "k*", markersize=10, label="batch-1 bound")
        repeats = sorted({t for lv in levels for t in lv["runs"] if t not in TARGETS})
        for target in (*TARGETS, *repeats):
            points = [(lv["runs"][target]["tpot_ms"]["p50"], lv["runs"][target]["output_throughput"], lv["label"])
                      for lv in levels if target in lv["runs"] and lv["runs"][target]["tpot_ms"]["p50"]]
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=target)
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("TPOT p50 (ms)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(wl["workload"]["name"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = report["meta"]
    # two lines: one panel is narrower than device, model and date together
    fig.suptitle(f"{meta['device']}, {meta['backend']} on {meta['torch_device']}\n"
                 f"{os.path.basename(meta['model'])} ({meta['layers']} layers), {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from services.launcher import add_arguments as add_mesh_arguments

    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="random:1024:1024,random:8192:1024,random:128:2048,sharegpt",
                        help="comma-separated random:IN:OUT or sharegpt")
    parser.add_argument("--concurrency", default="1,4,16,64,256", help="comma-separated closed-loop concurrencies")
    parser.add_argument("--request-rate", default="", help="comma-separated Poisson rates (req/s); replaces --concurrency")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight in rate mode")
    parser.add_argument("--num-prompts", type=int, default=0,
                        help="requests per level (0: max(8, --prompts-per-stream x concurrency); 64 per rate)")
    parser.add_argument("--prompts-per-stream", type=int, default=4,
                        help="requests per stream of a closed-loop level without --num-prompts (the full sweep: 2, "
                             "so its longest level fits a device call)")
    parser.add_argument("--references", default="engine,hf", help="comma-separated: engine, hf (empty: none)")
    parser.add_argument("--mesh-repeats", type=int, default=1,
                        help="passes of every level through the mesh; passes 2.. report as mesh#2, ... with "
                             "their ratio to the first (run-to-run spread)")
    parser.add_argument("--hf-batches", type=int, default=0,
                        help="static batches the hf reference runs per level (0: all the level's prompts)")
    parser.add_argument("--hf-max-batch", type=int, default=0,
                        help="the hf reference skips levels whose static batch is larger (0: none skipped)")
    parser.add_argument("--goodput", nargs="*", default=[], metavar="NAME:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    parser.add_argument("--stream-logprobs", action="store_true",
                        help="ask for logprobs=0 so the tokens of every streamed chunk are counted")
    parser.add_argument("--base-url", default=None, help="benchmark a running gateway instead of starting a mesh")
    parser.add_argument("--trace", action="store_true",
                        help="the started mesh exports its spans to its logs; report where TTFT goes (bench.mesh_trace)")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="start no run after this many seconds (0: no limit); skipped runs are listed in the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out/serve", help="folder for serve.json and serve.png")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of the serve.json already in --out and run only the missing ones "
                             "(a long sweep in parts: bench/serve_resume.py)")
    add_mesh_arguments(parser)
    Settings.add_arguments(parser, "run")
    parser.set_defaults(formatters=1)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.slo_ms = {}
    for item in args.goodput:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            parser.error(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        args.slo_ms[name] = float(value)
    return args


def level_rng(seed: int, workload: Workload, level: Level, repeat: int = 0) -> np.random.Generator:
    """The prompts' generator of one level (and mesh pass): its own seed, so any plan (or --resume part) draws the same ones."""
    label = f"{workload.name}/{level.label}" + (f"#{repeat + 1}" if repeat else "")
    return np.random.default_rng([seed, zlib.crc32(label.encode())])




def plan_levels(args) -> list[Level]:
    if args.request_rate:
        return [Level(args.max_concurrency, float(r)) for r in args.request_rate.split(",") if r]
    return [Level(int(c), None) for c in args.concurrency.split(",") if c]


def stop_tokens_for_completions(settings: Settings) -> list[int]:
    """The stop ids the formatter adds to every completion (the engine reference uses the same)."""
    from services.formatter.request import ENDOFTEXT
    from shared.vocab import ensure_vocab, load_harmony_encoding

    ensure_vocab(settings.vocab_dir)
    return list(load_harmony_encoding(settings.vocab_dir).stop_tokens_for_assistant_actions()) + [ENDOFTEXT]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.deadline = time.monotonic() + args.deadline_s if args.deadline_s > 0 else math.inf
    args.started, args.commit = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), git_commit()
    settings = Settings.from_args(args)
    levels = plan_levels(args)
    most = max(level.concurrency or 0 for level in levels)
    settings = dataclasses.replace(settings, max_queue=max(settings.max_queue, 4 * most + 16),
                                   log_level=args.log_level or "warning")
    references = [r for r in args.references.split(",") if r]
    unknown = set(references) - {"engine", "hf"}
    if unknown:
        print(f"bench.serve: unknown reference {sorted(unknown)[0]!r} (engine, hf)", file=sys.stderr)
        return 2
    for flag, value in (("--mesh-repeats", args.mesh_repeats), ("--prompts-per-stream", args.prompts_per_stream)):
        if value < 1:
            print(f"bench.serve: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    from services.setup import setup
    from services.worker.model.config import GptOssConfig

    setup(settings)
    config = GptOssConfig.from_pretrained(settings.model_path)
    max_len = settings.max_model_len or config.max_position_embeddings
    workloads = [Workload.parse(s, max_len) for s in args.workloads.split(",") if s]
    plan = []
    for wl in workloads:
        for level in levels:
            count = args.num_prompts or (max(8, args.prompts_per_stream * level.concurrency) if level.request_rate is None else 64)
            items = wl.requests(count, level_rng(args.seed, wl, level), max_len)
            plan.append({"workload": wl, "level": level, "items": items, "runs": {}})
    os.makedirs(args.out, exist_ok=True)
    args.prior = serve_resume.load_prior(args.out) if args.resume else None
    if args.prior is not None:
        kept = serve_resume.attach_prior(plan, args.prior)
        print(f"--resume: {kept} runs kept from {args.out}/serve.json", file=sys.stderr)
    bandwidth = copy_bandwidth(settings.device)
    _free_device_memory()
    print(f"copy bandwidth on {settings.device}: {bandwidth / 1e9:.1f} GB/s (read + write)", file=sys.stderr)

    args.gpu_monitor = GpuMonitor(_gpu_index(settings.device)) if settings.device.startswith("cuda") else None
    if args.gpu_monitor is not None and not args.gpu_monitor.start():
        args.gpu_monitor = None
    try:
        return run_targets(args, settings, plan, references, bandwidth, config)
    finally:
        if args.gpu_monitor is not None:
            args.gpu_monitor.stop()


def _gpu_index(device: str) -> int:
    """nvidia-smi's index for a torch device string (cuda, cuda:1) under CUDA_VISIBLE_DEVICES."""
    ordinal = int(device.partition(":")[2] or 0)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return int(visible[ordinal]) if ordinal < len(visible) and visible[ordinal].strip().isdigit() else ordinal


def run_targets(args, settings: Settings, plan: list[dict], references: list[str], bandwidth: float, config) -> int:
    """The mesh's passes, then each reference, writing the report after each; main's exit code."""
    from services.launcher import MeshError

    args.save_report = lambda: write_outputs(args, settings, plan, bandwidth, config)
    try:
        if serve_resume.pending(plan, mesh_targets(args)):
            run_mesh(args, settings, plan)
    except MeshError as exc:
        print(f"bench.serve: the mesh did not start: {exc}", file=sys.stderr)
        return MESH_FAILED
    write_outputs(args, settings, plan, bandwidth, config)  # a later reference may not finish
    references = [r for r in references if serve_resume.pending(plan, [r])]
    if references and time.monotonic() >= args.deadline:  # no model loads for levels that would all be skipped
        for entry in plan:
            for r in references:
                if not serve_resume.done_before(r, entry):
                    out_of_time(args, r, entry)
        references = []
    if "engine" in references:
        print("engine: in process, no mesh", file=sys.stderr)
        run_engine(args, settings, plan, stop_tokens_for_completions(settings))
        write_outputs(args, settings, plan, bandwidth, config)
    if "hf" in references:
        print("hf: transformers GptOssForCausalLM.generate", file=sys.stderr)
        run_hf(args, settings, plan)
    report = write_outputs(args, settings, plan, bandwidth, config)
    print_tables(report)
    print(f"\nwrote {args.out}/serve.json and {args.out}/serve.png")
    if report["meta"]["missing"]:
        print(f"{len(report['meta']['missing'])} runs missing (--resume runs them): "
              + ", ".join(report["meta"]["missing"]))
    return 0


def write_outputs(args, settings: Settings, plan: list[dict], bandwidth: float, config) -> dict:
    """serve.json and serve.png from the runs so far; the report."""
    import torch

    kv_itemsize = torch.empty((), dtype=getattr(torch, settings.dtype)).element_size()
    report = build_report(args, settings, plan, bandwidth, config, kv_itemsize)
    with open(os.path.join(args.out, "serve.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    plot(report, os.path.join(args.out, "serve.png"))
    return report


if __name__ == "__main__":
    sys.exit(main())
