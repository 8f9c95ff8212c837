"""What the engine's steps held while a level ran, from its step log (ROSE_STEP_LOG).

With ROSE_STEP_LOG=path the engine appends one JSON line per step it launches: the
monotonic time, decode rows, prompt tokens, prompts started, and the requests waiting
and running then. bench.serve --trace has the mesh's worker and the in-process engine
write one each and prints, per target and level, the mean step period and what a step
held: the same load through the mesh and in process should give the same steps.
"""

from __future__ import annotations

import json
import os


def read(path: str) -> list[dict]:
    """Every step line in the file (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summary(steps: list[dict], start: float, end: float) -> dict | None:
    """Means over the steps launched in [start, end] (monotonic seconds); None without any."""
    inside = [s for s in steps if start <= s["t"] <= end]
    if not inside:
        return None
    n = len(inside)
    starting = [s for s in inside if s["new"]]
    return {
        "steps": n,
        "period_ms": 1000 * (end - start) / n,
        "decode_rows": sum(s["decode"] for s in inside) / n,
        "prompt_tokens": sum(s["prompt_tokens"] for s in inside) / n,
        "starting_share": len(starting) / n,  # steps that start at least one prompt
        "prompts_per_start": sum(s["new"] for s in starting) / len(starting) if starting else 0.0,
        "waiting": sum(s["waiting"] for s in inside) / n,
    }
