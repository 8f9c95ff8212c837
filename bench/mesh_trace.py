"""Where a request's time to first token goes in the mesh, from the services' own spans.

    python -m bench.mesh_trace MESH_LOG_DIR

The services export their spans with `--otel-exporter console` (bench.serve --trace
sets it): one JSON object per span in each child's log, the top-level braces at the
start of a line. One request is one trace across gateway, formatter, scheduler and
worker; its stages, in ms:

    to the scheduler     gateway span start -> scheduler span start (gateway, formatter, two hops)
    scheduler wait       -> "dispatched" (its queue, the prefix index in Redis)
    to the worker        -> worker span start
    engine queue         the engine's arrival -> its first step with the request
    engine prefill       -> first token read on the host
    worker hand-over     worker span start -> its "first_token" event, less the two above
                         (the engine thread's wait to pick the request up is in engine queue)
    back to the gateway  -> the gateway's "first_delta" event

bench.serve adds "client and HTTP": the client's TTFT less the gateway span's.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import sys

GATEWAY, SCHEDULER, WORKER = "gateway.request", "scheduler.request", "worker.generate"


def read_spans(log_dir: str) -> list[dict]:
    """Every span the console exporter wrote into the logs under log_dir."""
    spans = []
    for path in sorted(glob.glob(os.path.join(log_dir, "*.log"))):
        with open(path, errors="replace") as fh:
            lines: list[str] | None = None
            for line in fh:
                if lines is None:
                    if line.rstrip("\n") == "{":
                        lines = [line]
                    continue
                lines.append(line)
                if line.rstrip("\n") == "}":
                    try:
                        spans.append(json.loads("".join(lines)))
                    except ValueError:
                        pass  # a log line from another thread cut into it
                    lines = None
    return spans


def _t(stamp: str) -> float:
    """An exporter timestamp (ISO 8601, UTC) as epoch seconds."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _event(span: dict, name: str) -> float | None:
    return next((_t(e["timestamp"]) for e in span.get("events", []) if e["name"] == name), None)


def ttft_stages(log_dir: str) -> dict[str, dict[str, float]]:
    """Gateway request id -> its stages (ms) and "gateway ttft", for traces that have all four spans."""
    traces: dict[str, dict[str, dict]] = {}
    for span in read_spans(log_dir):
        traces.setdefault(span["context"]["trace_id"], {})[span["name"]] = span
    out = {}
    for spans in traces.values():
        gateway, scheduler, worker = spans.get(GATEWAY), spans.get(SCHEDULER), spans.get(WORKER)
        if gateway is None or scheduler is None or worker is None:
            continue
        g0, s0, w0 = _t(gateway["start_time"]), _t(scheduler["start_time"]), _t(worker["start_time"])
        dispatched, first, delta = _event(scheduler, "dispatched"), _event(worker, "first_token"), _event(gateway, "first_delta")
        attrs = worker.get("attributes", {})
        queue, prefill = attrs.get("rose.engine.queue_ms"), attrs.get("rose.engine.prefill_ms")
        if None in (dispatched, first, delta, queue, prefill):
            continue
        out[gateway["attributes"]["rose.request_id"]] = {
            "to the scheduler": 1000 * (s0 - g0),
            "scheduler wait": 1000 * (dispatched - s0),
            "to the worker": 1000 * (w0 - dispatched),
            "engine queue": queue,
            "engine prefill": prefill,
            "worker hand-over": 1000 * (first - w0) - queue - prefill,
            "back to the gateway": 1000 * (delta - first),
            "gateway ttft": 1000 * (delta - g0),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir")
    args = parser.parse_args(argv)
    stages = ttft_stages(args.log_dir)
    if not stages:
        print(f"no complete traces under {args.log_dir} (were the services run with --otel-exporter console?)", file=sys.stderr)
        return 1
    names = list(next(iter(stages.values())))
    print(f"{len(stages)} requests\n| stage | p50 ms | mean ms | max ms |\n|---|---|---|---|")
    for name in names:
        values = [s[name] for s in stages.values()]
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.fmean(values):.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
