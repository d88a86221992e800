"""What this CPU can compute fast, read once from /proc/cpuinfo.

Machines of the same kind differ in CPU class: some have AVX-512 with native bf16 (AVX512-BF16 or
AMX), others AVX2 only, where bf16 is emulated and far slower than fp32. Code paths are chosen per
class (bf16 autocast only with native bf16), and every benchmark result records the class it was
measured on, because its timings say nothing about the other class.
"""

from __future__ import annotations

import os
import platform

# The flags that decide which code path is fast; recorded with every benchmark result.
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPU_CLASSES = ("avx512-bf16", "avx512", "avx2", "baseline")  # what cpu_class() returns, fastest first


def read_cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU; the platform's name and no flags where /proc is missing."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break  # the model name comes first; one CPU's flags are enough
    except OSError:
        pass
    return model, flags


def cpu_class(flags: set[str]) -> str:
    """avx512-bf16 (native bf16 matmuls), avx512, avx2, or baseline (none of those)."""
    if flags & NATIVE_BF16_FLAGS:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "baseline"


def cpu_profile() -> dict:
    """The CPU a benchmark ran on: model, cores, the flags that matter and the class they make."""
    model, flags = read_cpuinfo()
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in FLAGS_OF_INTEREST},
            "class": cpu_class(flags)}


def has_native_bf16() -> bool:
    return bool(read_cpuinfo()[1] & NATIVE_BF16_FLAGS)
