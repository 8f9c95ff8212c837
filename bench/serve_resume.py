"""`bench.serve --resume`: carry on a sweep an earlier invocation left unfinished, in the same --out.

A full sweep (four workloads, five concurrencies, three targets) takes hours; a GPU host lent for
minutes at a time runs it in parts. Each part starts from the serve.json the last one wrote: the
runs it holds (per workload, level and target) are kept as they are and not run again, the rest
run until --deadline-s, and the report then holds both. The prompts of a level are drawn from
its own seed (bench.serve.level_rng), so a part draws the same prompts as the one before whatever
else it plans. The report's meta lists every part's date, commit and command under "parts".
"""

from __future__ import annotations

import json
import os


def load_prior(out: str) -> dict | None:
    """The report an earlier invocation wrote into `out`, if any."""
    path = os.path.join(out, "serve.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def attach_prior(plan: list[dict], prior: dict) -> int:
    """Give each planned level the runs (and step summaries) the prior report holds for it; how many runs."""
    levels = {(block["workload"]["name"], level["label"]): level
              for block in prior.get("workloads", []) for level in block["levels"]}
    kept = 0
    for entry in plan:
        level = levels.get((entry["workload"].name, entry["level"].label))
        if level is not None and level["num_prompts"] == len(entry["items"]):
            entry["prior"] = level["runs"]
            entry["prior_steps"] = level.get("steps", {})
            kept += len(level["runs"])
    return kept


def done_before(target: str, entry: dict) -> bool:
    """Whether a part before this one ran `target` at this level."""
    return target in entry.get("prior", {})


def pending(plan: list[dict], targets) -> bool:
    """Whether any level still lacks a run of one of these targets."""
    return any(not done_before(t, entry) for entry in plan for t in targets)


def missing(plan: list[dict], targets) -> list[str]:
    """"workload level target" of each run neither this part nor one before it ran (transformers takes
    closed-loop levels only)."""
    return [f"{entry['workload'].name} {entry['level'].label} {t}" for entry in plan for t in targets
            if t not in entry["runs"] and not done_before(t, entry)
            and not (t == "hf" and entry["level"].request_rate is not None)]


def parts(prior: dict | None, meta: dict) -> list[dict]:
    """Every part's date, commit and command, this one last."""
    def part(m: dict) -> dict:
        return {k: m.get(k) for k in ("date", "commit", "command", "device")}

    earlier = [] if prior is None else prior["meta"].get("parts") or [part(prior["meta"])]
    return earlier + [part(meta)]
