import os

import pytest

from loralab.util import atomic_io


def test_staged_dir_replaces_only_on_success(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_io.staged_dir(dest) as staged:
        (staged / "weights").write_text("v1")
    assert (dest / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_io.staged_dir(dest) as staged:
            (staged / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (dest / "weights").read_text() == "v1"
    assert os.listdir(tmp_path) == ["adapter"]  # no staging debris


def test_swap_replaces_whole_directory(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_io.staged_dir(dest) as staged:
        (staged / "old_only").write_text("x")
    with atomic_io.staged_dir(dest) as staged:
        (staged / "weights").write_text("v2")
    assert sorted(os.listdir(dest)) == ["weights"]


def test_fallback_swap_recovers_after_a_crash_between_renames(tmp_path, monkeypatch):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "weights").write_text("good")
    # Simulate the fallback path dying after moving the old directory aside.
    os.rename(dest, tmp_path / "adapter.old")
    atomic_io.recover_dir(dest)
    assert (dest / "weights").read_text() == "good"
    monkeypatch.setattr(atomic_io, "_rename_exchange", lambda a, b: False)
    with atomic_io.staged_dir(dest) as staged:
        (staged / "weights").write_text("new")
    assert (dest / "weights").read_text() == "new" and not (tmp_path / "adapter.old").exists()


def test_write_json_leaves_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "m.json"
    atomic_io.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_io.write_json(path, {"a": object()})
    assert path.read_text().strip().startswith("{") and '"a": 1' in path.read_text()
    assert os.listdir(tmp_path) == ["m.json"]


def test_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_io.write_json(tmp_path / "f.json", {})
        with atomic_io.staged_dir(tmp_path / "d") as staged:
            (staged / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
