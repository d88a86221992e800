"""Typed run records and where they are kept: the one record store of every study.

A record is what a finished training run measured (eval loss, cost, and for compare its test-split
quality). It lives as `record.json` beside the run, and, for a study that commits them
(`compare`), also as `<records_dir>/<run name>.json`, so a fresh clone continues the study without
retraining. The JSON keys and their order are the dataclass fields': the committed records are
read and rewritten byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.util import atomic_io
from loralab.util.errors import LoralabError

RECORD_FILE = "record.json"


@dataclass
class TestQuality:
    """An adapter measured on the test split (compare's seed runs)."""

    __test__ = False  # not a pytest test class, whatever its name

    perplexity: float
    domain_accuracy: float
    per_task: dict[str, float]  # task -> primary metric, 0..1


@dataclass
class RunRecord:
    """One finished, budgeted training run."""

    params: dict[str, Any]  # the study's settings of this run (section.key -> value)
    lora_alpha: int
    trial_examples: int  # the run's training budget, in examples
    steps: int
    eval_loss: float
    eval_perplexity: float
    final_train_loss: float | None
    trainable_parameters: int
    adapter_mb: float
    wall_seconds: float
    tokens_per_s: float
    peak_rss_mb: float
    run_dir: str
    machine: dict[str, Any] | None = None  # timings compare only on the same CPU; a study may span machines
    test: TestQuality | None = None
    provenance: dict[str, Any] | None = None  # util.provenance.record of the code that trained it (None: older records)

    def to_json(self) -> dict[str, Any]:
        """The record as stored: fields in order, the optional ones only when present."""
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None or k not in ("machine", "test", "provenance")}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "run record") -> RunRecord:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if unknown or missing:
            raise LoralabError(f"{where}: not a run record (unknown keys {unknown}, missing {missing}); "
                               "delete it to run that configuration again")
        values = dict(data)
        if values.get("test") is not None:
            values["test"] = TestQuality(**values["test"])
        return cls(**values)


def read_record(path: str | Path) -> RunRecord:
    return RunRecord.from_json(json.loads(Path(path).read_text()), str(path))


def write_record(path: str | Path, record: RunRecord) -> None:
    atomic_io.write_json(path, record.to_json())


class RecordStore:
    """Finished runs of one study: `<run_root>/record.json`, plus a copy per run in `copies_dir`
    when the study commits its records (None: only the run directories)."""

    def __init__(self, copies_dir: str | Path | None = None):
        self.copies_dir = Path(copies_dir) if copies_dir is not None else None

    def _copy(self, run_root: Path) -> Path | None:
        return self.copies_dir / f"{run_root.name}.json" if self.copies_dir is not None else None

    def load(self, run_root: Path, needs_test: bool = False, needs_adapter: bool = False) -> RunRecord | None:
        """The run's record when it is finished (with its test quality when `needs_test`, with its adapter
        on disk when `needs_adapter`), from its run directory or else from the committed copy; None when
        the run is still to do. A record found in the run directory refreshes the copy (which may be
        older: written before the test)."""
        copy = None if needs_adapter else self._copy(run_root)
        if needs_adapter and not (run_root / "adapter" / "training_args.json").is_file():
            return None
        for path in (run_root / RECORD_FILE, copy):
            if path is not None and path.is_file():
                record = read_record(path)
                if record.test is not None or not needs_test:
                    if copy is not None and path != copy:
                        write_record(copy, record)
                    return record
        return None

    def save(self, run_root: Path, record: RunRecord) -> None:
        write_record(run_root / RECORD_FILE, record)
        if (copy := self._copy(run_root)) is not None:
            write_record(copy, record)
