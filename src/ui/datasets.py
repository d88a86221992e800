"""The Data tab: prepared datasets (a folder with dataset_card.json) and uploads, which go through
`prepare_dataset` exactly as `loralab prepare` does; a rejected upload leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

from loralab.config import DataConfig
from loralab.data.prepare import prepare_dataset
from loralab.ui.paths import Project
from loralab.ui.runs import read_json, walk
from loralab.util import atomic_io
from loralab.util.errors import LoralabError

CARD = "dataset_card.json"
SPLITS = ("train", "eval", "test")
SAMPLES_PER_SPLIT = 5
UPLOADS = "runs/ui/datasets"
EXTENSIONS = (".jsonl", ".json", ".csv")


def prepared_dirs(project: Project) -> list[str]:
    return sorted(project.relative(folder) for folder, files in walk(project) if CARD in files)


def view(project: Project, folder: Path) -> dict[str, Any]:
    card = read_json(folder / CARD)
    if not isinstance(card, dict):
        raise LoralabError(f"{project.relative(folder)}: no {CARD}; prepare a dataset there first")
    samples = {}
    for split in SPLITS:
        rows = read_json(folder / f"{split}_split.json") or []
        samples[split] = [{k: row.get(k) for k in ("task", "question", "answer")} for row in rows[:SAMPLES_PER_SPLIT]]
    return {"dir": project.relative(folder), "card": card, "splits": card.get("splits", {}),
            "tasks": card.get("tasks", {}), "cleaning": card.get("cleaning", {}),
            "skipped": card.get("skipped_invalid_rows"), "samples": samples}


def _upload_name(filename: str) -> tuple[str, str]:
    name = Path(str(filename)).name
    if not name.lower().endswith(EXTENSIONS):
        raise LoralabError(f"filename {name!r}: expected a {', '.join(EXTENSIONS)} file")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.rsplit(".", 1)[0]).strip("-.") or "dataset"
    return stem, name


def upload(project: Project, defaults: DataConfig, body: dict[str, Any]) -> dict[str, Any]:
    """Write the uploaded file under runs/ui/datasets/<name>/ (a new folder: nothing is replaced) and
    prepare it there; on any error the folder is removed and the error is the CLI's one line."""
    stem, name = _upload_name(body.get("filename", ""))
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise LoralabError(f"{name}: the file is empty")
    base = project.resolve(UPLOADS)
    base.mkdir(parents=True, exist_ok=True)
    folder, n = base / stem, 1
    while True:  # mkdir reserves the name: two uploads at once never share (or remove) one folder
        try:
            folder.mkdir()
            break
        except FileExistsError:
            n += 1
            folder = base / f"{stem}-{n}"
    options = {key: body[key] for key in ("format", "question_field", "answer_field", "task_field", "skip_invalid")
               if body.get(key) not in (None, "")}
    cfg = dataclasses.replace(defaults, **options, dataset=str(folder / name), out_dir=str(folder / "data"))
    try:
        cfg.validate()
        atomic_io.write_text(folder / name, content)
        card = prepare_dataset(cfg)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"out_dir": project.relative(folder / "data"), "card": json.loads(json.dumps(card))}
