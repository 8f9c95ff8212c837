"""What the GPU's clocks, temperature and power did while each benchmark run went (nvidia-smi).

Two passes of the same load through the same mesh should give the same figures; when they do
not, the first question is whether the GPU itself ran slower (power capping or thermal slowdown
after minutes of load) or the software did. GpuMonitor runs `nvidia-smi -lms` beside the
benchmark, stamps each sample with this process's monotonic clock as it arrives, and summarizes
the samples inside a run's window.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

FIELDS = ("clocks.sm", "clocks.mem", "temperature.gpu", "power.draw", "clocks_throttle_reasons.active")
# nvidia-smi's clock event reasons (bit -> name); 0x1 (idle) and 0x2 (application clocks) are not slowdowns
SLOWDOWNS = {0x4: "sw power cap", 0x8: "hw slowdown", 0x20: "sw thermal", 0x40: "hw thermal", 0x80: "power brake"}


def parse_sample(line: str) -> dict | None:
    """One CSV line of FIELDS (noheader, nounits) as numbers; None for a line that is not one."""
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != len(FIELDS):
        return None
    try:
        sm, mem, temp, power = (float(c) for c in cells[:4])
        reasons = int(cells[4], 16)
    except ValueError:  # "[N/A]" or a header
        return None
    return {"sm_mhz": sm, "mem_mhz": mem, "temp_c": temp, "power_w": power, "reasons": reasons}


def summarize(samples: list[tuple[float, dict]], start: float, end: float) -> dict | None:
    """Means and extremes over the samples taken in [start, end] (monotonic seconds); None without any."""
    inside = [s for t, s in samples if start <= t <= end]
    if not inside:
        return None
    n = len(inside)
    slowed = [s for s in inside if s["reasons"] & sum(SLOWDOWNS)]
    seen = 0
    for s in inside:
        seen |= s["reasons"]
    return {
        "samples": n,
        "sm_mhz_mean": sum(s["sm_mhz"] for s in inside) / n,
        "sm_mhz_min": min(s["sm_mhz"] for s in inside),
        "mem_mhz_mean": sum(s["mem_mhz"] for s in inside) / n,
        "temp_c_max": max(s["temp_c"] for s in inside),
        "power_w_mean": sum(s["power_w"] for s in inside) / n,
        "power_w_max": max(s["power_w"] for s in inside),
        "slowed_share": len(slowed) / n,  # samples with a power or thermal slowdown active
        "slowdowns": [name for bit, name in SLOWDOWNS.items() if seen & bit],
    }


class GpuMonitor:
    """nvidia-smi sampling GPU `index` every `interval_ms` in a thread; a no-op where nvidia-smi is missing."""

    def __init__(self, index: int = 0, interval_ms: int = 500):
        self.index, self.interval_ms = index, interval_ms
        self.samples: list[tuple[float, dict]] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> bool:
        """Start sampling; False where nvidia-smi is not there."""
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return False
        self._proc = subprocess.Popen(
            [exe, "-i", str(self.index), "--query-gpu=" + ",".join(FIELDS), "--format=csv,noheader,nounits",
             "-lms", str(self.interval_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, name="gpu-monitor", daemon=True)
        self._reader.start()
        return True

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_sample(line)
            if sample is not None:
                self.samples.append((time.monotonic(), sample))

    def summary(self, start: float, end: float) -> dict | None:
        return summarize(list(self.samples), start, end)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._reader.join(timeout=10)
            self._proc = None
