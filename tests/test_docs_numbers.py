"""Every measured figure in the README, submission.md and docs/ comes from a committed result file.

A figure is a number with a decimal point in prose or a table (`7.29`, `1.78x`, `+0.71 %`, `17.8 minutes`); numbers
in code blocks and inline code are commands and config values, not results. A paragraph or list item that shows
figures must cite the files they come from, or its section (the text under a heading) must, as paths under
experiments/, benchmarks/results/ or lora/ (globs allowed: `experiments/compare_runs/*.json`; `PATH@COMMIT` cites
the file as an earlier commit holds it), and each figure must be found in one of them at the precision it is
written: among the numbers of a JSON file (its values, and numbers inside its strings) or of a generated
Markdown/text file, also in its JSON/Markdown twin, also as a percentage (x100), as minutes (seconds / 60) and as
GB (MB / 1000 or 1024).

This is a search, not a derivation: a figure that happens to round like some other number of a large file passes.
What it catches is a figure retyped from a result that has since been regenerated, a number from nowhere, and a
section that states measurements without saying where they come from. tests/test_docs_quotes.py checks the tables
quoted line for line.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "submission.md", *sorted((REPO / "docs").glob("*.md"))]
# A result file, or one as an earlier commit holds it (`benchmarks/results/inference_avx2.json@5c6f0cf`).
CITATION = re.compile(r"((?:experiments|benchmarks/results|lora)/[\w./*-]+\.(?:json|md|txt)(?:@[0-9a-f]{7,40})?)")
FIGURE = re.compile(r"(?<![\w.])(?<![A-Za-z]-)\d[\d,]*\.\d+(?![\w.])")  # 7.29, 1,089.5; not 2.13.0, v1.2, GPL-3.0
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
CODE_BLOCK = re.compile(r"```.*?```", re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def sections(doc: Path) -> list[tuple[str, str]]:
    """(heading, text) of every section; the text before the first heading is a section too."""
    found, heading, lines = [], "(top)", []
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            found.append((heading, "\n".join(lines)))
            heading, lines = line.strip("# "), []
        else:
            lines.append(line)
    return [*found, (heading, "\n".join(lines))]


def figures(text: str) -> list[str]:
    prose = CODE_BLOCK.sub("", text)
    prose = INLINE_CODE.sub(lambda m: "" if not CITATION.search(m.group(0)) else m.group(0), prose)
    prose = CITATION.sub("", prose)  # a path's digits are not figures
    return FIGURE.findall(prose)


def cited_files(text: str) -> list[str]:
    """The cited files as `path` or `path@commit`, with their JSON/Markdown twins."""
    files = []
    for citation in set(CITATION.findall(text)):
        if "@" in citation:
            files.append(citation)
            continue
        for path in sorted(REPO.glob(citation)):
            files.append(path.relative_to(REPO).as_posix())
            files += [twin.relative_to(REPO).as_posix() for twin in (path.with_suffix(".json"), path.with_suffix(".md"))
                      if twin != path and twin.exists()]
    return files


@cache
def numbers_in(cited: str) -> tuple[float, ...]:
    """Every number the file's text holds: JSON values and numbers in strings alike (`wall=1011s`, `1,117 s`)."""
    if "@" in cited:
        path, commit = cited.split("@")
        shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True, check=False)
        assert shown.returncode == 0, f"{cited}: not in this clone's history ({shown.stderr.strip()})"
        text = shown.stdout
    else:
        text = (REPO / cited).read_text(encoding="utf-8", errors="replace")
    return tuple(float(n.replace(",", "")) for n in NUMBER.findall(text))


def is_found(figure: str, numbers: list[float]) -> bool:
    value, decimals = float(figure.replace(",", "")), len(figure.split(".")[1])
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(abs(candidate) - value) <= tolerance
               for number in numbers for candidate in (number, number * 100, number / 60, number / 1000, number / 1024))


def blocks(text: str) -> list[str]:
    """Paragraphs and list items (each with its continuation lines); a table is one block."""
    found: list[list[str]] = []
    for line in CODE_BLOCK.sub("", text).splitlines():
        if not line.strip():
            found.append([])
            continue
        current = found[-1] if found else []
        row, after_row = line.lstrip().startswith("|"), bool(current) and current[-1].lstrip().startswith("|")
        starts_item = re.match(r"\s*([-*]|\d+\.)\s", line) is not None
        if current and ((row and after_row) or not (row or after_row or starts_item)):
            current.append(line)
        else:
            found.append([line])
    return ["\n".join(block) for block in found if block]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_figure_is_found_in_a_result_its_section_cites(doc):
    """A paragraph or list item that cites result files is checked against those; one that cites none, against
    every file its section cites."""
    problems = []
    for heading, text in sections(doc):
        section_files = cited_files(text)
        for block in blocks(text):
            shown = figures(block)
            if not shown:
                continue
            files = cited_files(block) or section_files
            if not files:
                problems.append(f"section '{heading}' shows {shown[:5]} but cites no result file")
                continue
            numbers = [n for path in files for n in numbers_in(path)]
            missing = [figure for figure in shown if not is_found(figure, numbers)]
            if missing:
                problems.append(f"section '{heading}': {missing} not found in {sorted(set(files))}")
    assert not problems, f"{doc.name}: " + "; ".join(problems)


def test_the_search_finds_a_figure_only_at_its_precision():
    assert is_found("7.29", [7.2912]) and is_found("+0.71 %".split()[0].lstrip("+"), [0.0071])
    assert is_found("17.8", [1068.0]) and is_found("1,089.5", [1089.49])
    assert not is_found("7.29", [7.2951]) and not is_found("7.3", [7.36])
    assert figures("r `0.5`, ppl 7.29 -> 6.10 (-2.0), v2.13.0, CC-BY-4.0, ```\n3.5\n``` `experiments/a1.2.json`") == [
        "7.29", "6.10", "2.0"]
