"""The one writer of a study's results: JSON, Markdown and plots, atomically and in a safe order."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loralab.util import atomic_io, provenance


def json_bytes(obj: Any) -> bytes:
    """JSON as every loralab result file is written (atomic_io.write_json's format)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_results(json_path: str | Path, summary: dict, md_path: str | Path, markdown: Callable[[dict], str],
                  plots: Callable[[dict], None] | None = None, extra_files: dict[Path, bytes] | None = None, *,
                  config: dict[str, Any]) -> None:
    """The JSON first, so a plotting error never loses measurements; then the plots (which may add to
    the summary, e.g. the list of plots drawn); then the final JSON, the Markdown and any extra files
    together, as one atomic set. The JSON carries the provenance block of the study's `config`."""
    summary["provenance"] = provenance.record(config)
    atomic_io.write_json(json_path, summary)
    if plots is not None:
        plots(summary)
    atomic_io.write_files({Path(json_path): json_bytes(summary), Path(md_path): markdown(summary).encode("utf-8"),
                           **(extra_files or {})})
