"""jemalloc under the `loralab` command, where the machine has it: a fifth less peak memory in training.

glibc's malloc keeps freed activation buffers of a step in its arenas, so peak RSS grows with
fragmentation; the "default, glibc malloc" row of `python benchmarks/train_throughput.py --ablation`
against its default row measures what jemalloc saves. glibc's own knobs, tried by hand (not
committed), did not get there: a fixed mmap threshold halved the speed (a page fault per large
tensor), and malloc_trim after each step saved far less.
An allocator can only be chosen before the process starts, so the console entry
point re-executes itself once with LD_PRELOAD set, as PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu`) does. LORALAB_ALLOCATOR=system keeps glibc's malloc; library calls
(`from loralab... import train`) are never affected.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "LORALAB_ALLOCATOR"  # "system": glibc's malloc; set to "jemalloc" by the re-execution itself
CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
              "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def jemalloc_library(candidates: tuple[str, ...] = CANDIDATES) -> str | None:
    return next((path for path in candidates if Path(path).is_file()), None)


def preload_env(env: dict[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the process should go on as it is."""
    if env.get(ENV) in ("system", "jemalloc") or library is None or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    preload = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    return {**env, "LD_PRELOAD": preload, ENV: "jemalloc"}


def reexec_with_jemalloc(python_args: list[str]) -> None:
    """Replace this process by `python <python_args>` (the CLI: -m loralab <verb> ...) with jemalloc
    preloaded; returns only when it should not (another allocator asked for, none installed, not
    Linux, already done)."""
    if not sys.platform.startswith("linux"):
        return
    env = preload_env(dict(os.environ), jemalloc_library())
    if env is not None:
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *python_args], env)


def allocator_in_use() -> str:
    """What this process allocates with, for the records a run writes: "jemalloc" or "glibc"."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"
