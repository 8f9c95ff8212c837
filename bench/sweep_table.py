"""One markdown table of a bench.serve report: every level's targets side by side.

    python -m bench.sweep_table bench/results/full-sweep/serve.json

bench.serve prints a table per workload with a row per target; a sweep of four workloads,
five levels and three targets reads better as one row per level: output tokens/s of each
target and the roofline, the mesh's ratios to the references, and the mesh's TTFT and TPOT
p50. A reference whose run failed shows its failures (transformers out of memory) instead of
a rate; one not run shows '-'. Then the report's parts (date, commit) and the runs missing.
"""

from __future__ import annotations

import argparse
import json


def _rate(run: dict | None) -> str:
    if not run:
        return "-"
    if run["completed"] == 0:
        reason = run["errors"][0].split(":")[0] if run.get("errors") else "failed"
        return f"failed ({reason})"
    return f"{run['output_throughput']:.1f}"


def _ratio(level: dict, pair: str) -> str:
    value = level.get("ratios", {}).get(pair, {}).get("output_throughput")
    return f"{value:.2f}x" if value else "-"


def sweep_rows(report: dict) -> list[str]:
    """The markdown lines of the table (header included)."""
    lines = ["| workload | c | mesh tok/s | engine tok/s | transformers tok/s | roofline tok/s | mesh/engine | "
             "mesh/transformers | mesh TTFT p50 ms | mesh TPOT p50 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for workload in report["workloads"]:
        name = workload["workload"]["name"]
        for level in workload["levels"]:
            runs = level["runs"]
            mesh = runs.get("mesh")
            ttft = f"{mesh['ttft_ms']['p50']:.1f}" if mesh and mesh["completed"] else "-"
            tpot = f"{mesh['tpot_ms']['p50']:.2f}" if mesh and mesh["completed"] else "-"
            lines.append(
                f"| {name} | {level['concurrency']} | {_rate(mesh)} | {_rate(runs.get('engine'))} | "
                f"{_rate(runs.get('hf'))} | {level['roofline']['tokens_per_s']:.0f} | {_ratio(level, 'mesh/engine')} | "
                f"{_ratio(level, 'mesh/hf')} | {ttft} | {tpot} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="a serve.json written by bench.serve")
    args = parser.parse_args(argv)
    with open(args.report) as fh:
        report = json.load(fh)
    print("\n".join(sweep_rows(report)))
    meta = report["meta"]
    for part in meta.get("parts", []):
        print(f"part: {part['date']} commit {part['commit']} on {part['device']}")
    missing = meta.get("missing") or []
    print(f"{len(missing)} runs missing" + (f": {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
