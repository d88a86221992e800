"""The `loralab` command's allocator choice: jemalloc where installed, never when asked not to."""

import os
import subprocess
import sys

import pytest

from loralab.util import allocator

LIB = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_preload_env_adds_jemalloc_once():
    env = allocator.preload_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, LIB)
    assert env["LD_PRELOAD"] == f"{LIB} libfoo.so" and env[allocator.ENV] == "jemalloc" and env["PATH"] == "/bin"
    assert allocator.preload_env(env, LIB) is None  # the re-executed process goes on


@pytest.mark.parametrize("env", [{allocator.ENV: "system"}, {"LD_PRELOAD": "/opt/libjemalloc.so.2"}])
def test_preload_env_respects_the_users_choice(env):
    assert allocator.preload_env(env, LIB) is None


def test_no_jemalloc_installed_means_no_reexecution(tmp_path):
    assert allocator.jemalloc_library((str(tmp_path / "libjemalloc.so.2"),)) is None
    assert allocator.preload_env({}, None) is None


@pytest.mark.skipif(allocator.jemalloc_library() is None, reason="libjemalloc2 not installed (make jemalloc)")
def test_reexecuted_process_runs_under_jemalloc():
    probe = "import os; print('jemalloc' in open('/proc/self/maps').read(), os.environ['LORALAB_ALLOCATOR'])"
    code = ("from loralab.util.allocator import reexec_with_jemalloc; "
            f"reexec_with_jemalloc(['-c', {probe!r}]); print('not replaced')")
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["True", "jemalloc"], out.stderr
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**env, allocator.ENV: "system"})
    assert kept.stdout.strip() == "not replaced"
