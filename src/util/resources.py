"""Peak resident memory of one block of work, not of the whole process.

`ru_maxrss` is the high-water mark of the process's whole life: in a search that runs trials one
after another in one process, it would report the largest trial so far for every later trial.
This samples the current RSS from /proc in a background thread while the block runs instead.
"""

from __future__ import annotations

import os
import resource
import threading

from loralab.util.cpu import NATIVE_BF16_FLAGS, read_cpuinfo

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: the process-lifetime peak is the best available figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRss:
    """`with PeakRss() as rss: ...` then `rss.peak_mb`: the highest RSS seen while the block ran."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRss:
        self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


def machine_description() -> dict:
    """The CPU a result was measured on: timings are only comparable on the same one."""
    model, flags = read_cpuinfo()
    return {"cpu": model, "cores": os.cpu_count(), "bf16": bool(NATIVE_BF16_FLAGS & flags)}


def machine_summary(machine: dict) -> str:
    return f"{machine['cpu']}, {machine['cores']} cores, {'with' if machine['bf16'] else 'without'} native bf16"
