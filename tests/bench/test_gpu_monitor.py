"""bench/gpu_monitor.py: nvidia-smi's samples parsed, stamped and summarized per window."""

from __future__ import annotations

import os
import stat
import time

import pytest

from bench.gpu_monitor import GpuMonitor, parse_sample, summarize


def test_parse_sample_reads_numbers_and_the_reason_mask():
    assert parse_sample("1980, 2619, 61, 412.57, 0x0000000000000004\n") == {
        "sm_mhz": 1980.0, "mem_mhz": 2619.0, "temp_c": 61.0, "power_w": 412.57, "reasons": 4}
    assert parse_sample("1980, 2619, 61, [N/A], 0x0") is None
    assert parse_sample("clocks.current.sm [MHz], clocks.current.memory [MHz]") is None


def test_summarize_keeps_the_window_and_names_slowdowns():
    def sample(sm, power, reasons):
        return {"sm_mhz": sm, "mem_mhz": 2619.0, "temp_c": 50.0 + sm / 1000, "power_w": power, "reasons": reasons}

    samples = [(0.5, sample(345, 70, 0x1)),  # idle before the run: outside the window
               (1.0, sample(1980, 600, 0x0)), (2.0, sample(1500, 700, 0x4)), (3.0, sample(1200, 690, 0x20 | 0x4)),
               (9.0, sample(1980, 100, 0x0))]
    got = summarize(samples, 1.0, 3.0)
    assert got["samples"] == 3
    assert got["sm_mhz_mean"] == pytest.approx((1980 + 1500 + 1200) / 3) and got["sm_mhz_min"] == 1200
    assert got["power_w_max"] == 700 and got["temp_c_max"] == pytest.approx(51.98)
    assert got["slowed_share"] == pytest.approx(2 / 3)
    assert got["slowdowns"] == ["sw power cap", "sw thermal"]
    assert summarize(samples, 4.0, 8.0) is None


def test_monitor_reads_a_running_nvidia_smi(tmp_path, monkeypatch):
    # a stand-in for the nvidia-smi executable: the monitor's process plumbing, not a GPU
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo '1755, 2619, 55, 300.5, 0x0000000000000000'; sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monitor = GpuMonitor(interval_ms=50)
    assert monitor.start()
    start = time.monotonic()
    time.sleep(0.5)
    end = time.monotonic()
    monitor.stop()
    got = monitor.summary(start, end)
    assert got is not None and got["samples"] >= 3
    assert got["sm_mhz_mean"] == 1755 and got["slowdowns"] == []


def test_monitor_without_nvidia_smi_does_not_start(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert GpuMonitor().start() is False
