"""A study's finished measurements, on disk, so a killed study keeps every one it finished."""

from __future__ import annotations

import json
from pathlib import Path

from loralab.util import atomic_io


class Cells:
    """key -> measured value, written through to one JSON file at each `put`."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str):
        return self.values.get(key)

    def put(self, key: str, value: dict) -> dict:
        self.values[key] = value
        atomic_io.write_json(self.path, self.values)
        return value
