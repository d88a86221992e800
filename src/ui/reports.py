"""Markdown reports as HTML for the page: markdown-it-py with raw HTML off, so text from a dataset
(a question holding `<script>`) is shown, never run; images point at the project's /files/ route."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from markdown_it import MarkdownIt

from loralab.ui.paths import OutsideProject, Project

_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def render_markdown(project: Project, path: Path) -> str | None:
    """The report at `path` as HTML, or None when there is none."""
    if not path.is_file():
        return None
    tokens = _MARKDOWN.parse(path.read_text(encoding="utf-8"))
    for token in tokens:
        for child in token.children or ():
            if child.type == "image":
                child.attrSet("src", _file_url(project, path.parent, str(child.attrGet("src") or "")))
    return _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})


def _file_url(project: Project, folder: Path, src: str) -> str:
    if "://" in src or src.startswith(("/", "data:")):
        return src
    try:
        return "/files/" + quote(project.relative(project.resolve(folder / src)))
    except (OutsideProject, ValueError):
        return ""
