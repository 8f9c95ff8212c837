"""bench/serve.py end to end: a real mesh (tiny model, CPU), a few requests, a consistent report."""

from __future__ import annotations

import json
import os

import pytest

from bench import serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS, INPUT_LEN, OUTPUT_LEN = 3, 24, 8


@pytest.fixture(scope="module")
def serve_run(rose_home, vocab_dir, tiny_checkpoint, tmp_path_factory):
    """(the run's arguments without --out, its --out folder), once per module."""
    out = tmp_path_factory.mktemp("serve")
    argv = [
        "--workloads", f"random:{INPUT_LEN}:{OUTPUT_LEN}",
        "--concurrency", "1,3",
        "--num-prompts", str(PROMPTS),
        "--references", "engine",
        "--mesh-repeats", "2",
        "--stream-logprobs",
        "--trace",
        "--goodput", "ttft:60000", "tpot:60000",
        "--home", rose_home, "--model", tiny_checkpoint, "--tiktoken-encodings-base", vocab_dir,
    ]
    assert serve.main(argv + ["--out", str(out)]) == 0
    assert os.path.getsize(out / "serve.png") > 0
    return argv, out


@pytest.fixture(scope="module")
def report(serve_run):
    with open(serve_run[1] / "serve.json", encoding="utf-8") as fh:
        return json.load(fh)


def _runs(report):
    for workload in report["workloads"]:
        for level in workload["levels"]:
            for target, run in level["runs"].items():
                yield level, target, run


def test_every_level_ran_every_target(report):
    (workload,) = report["workloads"]
    assert workload["workload"] == {"name": f"random-{INPUT_LEN}-{OUTPUT_LEN}", "input_len": INPUT_LEN, "output_len": OUTPUT_LEN, "caps": None,
                                    "shared_prefix": 0}
    assert [lv["concurrency"] for lv in workload["levels"]] == [1, 3]
    for level in workload["levels"]:
        assert set(level["runs"]) == {"mesh", "mesh#2", "engine"}
        assert set(level["ratios"]) == {"mesh/engine", "mesh#2/mesh"}
        assert level["num_prompts"] == PROMPTS
    assert report["meta"]["missing"] == []


def test_counts_add_up(report):
    for level, target, run in _runs(report):
        requests = run["requests"]
        assert len(requests) == PROMPTS == run["completed"] + run["failed"]
        assert run["failed"] == 0, run["errors"]
        assert run["output_tokens"] == sum(r["output_tokens"] for r in requests)
        assert run["input_tokens"] == sum(r["prompt_tokens"] for r in requests) == PROMPTS * INPUT_LEN
        assert run["requested_output_tokens"] == PROMPTS * OUTPUT_LEN
        for r in requests:
            # what the server counted is what arrived in the stream, chunk by chunk
            assert r["streamed_tokens"] == r["output_tokens"], (target, r)
            assert 1 <= r["output_tokens"] <= OUTPUT_LEN
            if r["finish_reason"] == "length":
                assert r["output_tokens"] == OUTPUT_LEN
        assert run["efficiency"]["generated_fraction"] == pytest.approx(run["output_tokens"] / (PROMPTS * OUTPUT_LEN))
        assert run["output_throughput"] == pytest.approx(run["output_tokens"] / run["duration_s"])
        assert run["request_throughput"] == pytest.approx(PROMPTS / run["duration_s"])
        assert run["goodput"] == pytest.approx(run["request_throughput"])  # SLOs of a minute: all requests meet them


def test_a_repeat_pass_does_not_reuse_the_first_pass_prompts(report):
    """mesh#2 redraws its prompts' ids: with the first pass's, the mesh's prefix cache would serve
    each prompt's full blocks (16 of its 24 tokens) and the pass would measure other work."""
    for level, target, run in _runs(report):
        assert run["cached_input_tokens"] == 0, (target, level["label"])
        assert all(r["cached_tokens"] == 0 for r in run["requests"])


def test_percentiles_are_ordered(report):
    for level, target, run in _runs(report):
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            stats = run[metric]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (target, metric, stats)
        assert run["ttft_ms"]["p99"] <= run["e2el_ms"]["p99"]


def test_roofline_and_ratios(report):
    assert report["copy_bandwidth_bytes_per_s"] > 0
    (workload,) = report["workloads"]
    b1 = workload["roofline_batch1"]
    assert b1["batch"] == 1 and b1["weight_bytes"] > 0 and b1["kv_bytes"] > 0
    assert b1["step_s"] == pytest.approx((b1["weight_bytes"] + b1["kv_bytes"]) / report["copy_bandwidth_bytes_per_s"])
    three = workload["levels"][1]
    assert three["roofline"]["batch"] == 3 and three["roofline"]["tokens_per_s"] > b1["tokens_per_s"]
    ratio = three["ratios"]["mesh/engine"]
    mesh, engine = three["runs"]["mesh"], three["runs"]["engine"]
    assert ratio["output_throughput"] == pytest.approx(mesh["output_throughput"] / engine["output_throughput"])
    again = three["ratios"]["mesh#2/mesh"]
    assert again["tpot_ms_p50"] == pytest.approx(three["runs"]["mesh#2"]["tpot_ms"]["p50"] / mesh["tpot_ms"]["p50"])


MESH_STAGES = {"to the scheduler", "scheduler wait", "to the worker", "engine queue", "engine prefill",
               "worker hand-over", "back to the gateway", "client and HTTP"}
ENGINE_STAGES = {"engine queue", "engine prefill", "to the client"}


def test_ttft_stages_come_from_each_request_and_add_up_to_its_ttft(report):
    """--trace: each mesh request found its own trace (the stages sum to that request's TTFT)."""
    for level, target, run in _runs(report):
        stages = ENGINE_STAGES if target == "engine" else MESH_STAGES
        assert set(run["ttft_stages_ms"]) == stages, (target, level["label"])
        for r in run["requests"]:
            found = r["ttft_stages_ms"]
            assert found is not None and set(found) == stages, (target, r["request_id"])
            assert found["engine prefill"] > 0 and found["engine queue"] >= 0
            # the engine's durations and the spans' wall clock differ by rounding only
            assert sum(found.values()) == pytest.approx(r["ttft_ms"], abs=1.0), (target, r["request_id"], found)


def test_step_summaries_cover_every_run(report):
    """--trace: the worker's and the in-process engine's step logs summarised for every run."""
    for level, target, run in _runs(report):
        steps = level["steps"][target]
        assert steps is not None and steps["steps"] > 0, (target, level["label"])
        assert 0 < steps["decode_rows"] <= level["concurrency"]
        assert 0 < steps["starting_share"] <= 1 and steps["prompts_per_start"] >= 1


def test_resume_runs_only_what_is_missing(serve_run, report, tmp_path):
    """--resume in a folder whose report lacks the engine's run at 3 streams: that run alone happens (no
    mesh starts: its runs are all there), every other run is kept as it was, and the meta lists both parts."""
    argv, _ = serve_run
    partial = json.loads(json.dumps(report))
    (workload,) = partial["workloads"]
    last = workload["levels"][1]
    assert last["label"] == "c=3"
    del last["runs"]["engine"], last["steps"]["engine"]
    last["ratios"] = {}
    with open(tmp_path / "serve.json", "w", encoding="utf-8") as fh:
        json.dump(partial, fh)
    assert serve.main(argv + ["--out", str(tmp_path), "--resume"]) == 0
    assert not (tmp_path / "mesh-logs").exists()  # the mesh never started
    with open(tmp_path / "serve.json", encoding="utf-8") as fh:
        resumed = json.load(fh)
    before, after = report["workloads"][0]["levels"], resumed["workloads"][0]["levels"]
    assert after[0]["runs"] == before[0]["runs"] and after[0]["steps"] == before[0]["steps"]
    for target in ("mesh", "mesh#2"):
        assert after[1]["runs"][target] == before[1]["runs"][target]
    engine = after[1]["runs"]["engine"]
    assert engine != before[1]["runs"]["engine"]  # run again: its own times
    assert engine["completed"] == PROMPTS and engine["failed"] == 0
    assert [r["prompt_tokens"] for r in engine["requests"]] == [INPUT_LEN] * PROMPTS
    assert set(after[1]["ratios"]) == {"mesh/engine", "mesh#2/mesh"} and after[1]["steps"]["engine"]["steps"] > 0
    assert resumed["meta"]["missing"] == []
    parts = resumed["meta"]["parts"]
    assert len(parts) == 2 and all(p["command"].startswith("python -m bench.serve") for p in parts)
    assert "--resume" in parts[1]["command"] and "--resume" not in parts[0]["command"]


def test_the_engine_reference_ignores_eos_as_the_mesh_does():
    """The mesh's requests carry ignore_eos, which the formatter turns into no stop ids: the in-process
    engine gets the same, so neither stops on Harmony's end-of-sequence ids before max_tokens."""
    params = serve.engine_request_params(64, [200002, 200012, 199999])
    assert params.max_tokens == 64 and params.ignore_eos and params.stop_token_ids == []


def test_sweep_table_has_a_row_a_level_with_each_targets_rate(report):
    from bench.sweep_table import sweep_rows

    rows = sweep_rows(report)[2:]
    levels = [(w["workload"]["name"], level) for w in report["workloads"] for level in w["levels"]]
    assert len(rows) == len(levels)
    for row, (name, level) in zip(rows, levels):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:2] == [name, str(level["concurrency"])]
        assert float(cells[2]) == pytest.approx(level["runs"]["mesh"]["output_throughput"], abs=0.05)
        assert float(cells[3]) == pytest.approx(level["runs"]["engine"]["output_throughput"], abs=0.05)
        assert cells[4] == "-"  # transformers was not a reference here
        assert cells[6] == f"{level['ratios']['mesh/engine']['output_throughput']:.2f}x"
