"""Numbers in the README, submission.md and docs/ that come from a result are quoted, not retyped: a block of
lines under a `<!-- quoted from PATH -->` marker must appear line for line in PATH, a file that a loralab command
generated (experiments/report.md, ...). When the result is regenerated, a stale quote fails here."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "submission.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- quoted from (\S+) -->")


def quoted_blocks(doc: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, cited path, the block's lines) for every marker: the lines after it up to a blank line."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks = []
    for number, line in enumerate(lines):
        match = MARKER.search(line)
        if match:
            block = []
            for following in lines[number + 1:]:
                if not following.strip():
                    break
                block.append(following.strip())
            blocks.append((number + 1, match.group(1), block))
    return blocks


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_quoted_block_is_in_the_generated_file_it_cites(doc):
    for number, cited, block in quoted_blocks(doc):
        source = REPO / cited
        assert source.is_file(), f"{doc.name}:{number}: quotes {cited}, which is not in the repository"
        assert block, f"{doc.name}:{number}: a quote marker with nothing under it"
        generated = {line.strip() for line in source.read_text(encoding="utf-8").splitlines()}
        missing = [line for line in block if line not in generated]
        assert not missing, f"{doc.name}:{number}: not in {cited} (regenerated since?): {missing[:3]}"


def test_the_headline_results_are_quoted():
    """The README's and the submission's headline tables are quotes of the evaluation report."""
    for doc in (REPO / "README.md", REPO / "submission.md", REPO / "docs" / "results.md"):
        assert any(cited == "experiments/report.md" for _, cited, _ in quoted_blocks(doc)), doc.name
