"""Every path a UI request names is resolved inside the project folder, or refused."""

from __future__ import annotations

from pathlib import Path

from loralab.util.errors import LoralabError


class OutsideProject(LoralabError):
    """A request named a path outside the project folder (answered 403)."""


class Project:
    """The folder `loralab ui` was started in: where it looks for runs and where jobs run."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def resolve(self, relative: str | Path) -> Path:
        """`relative` (or an absolute path) as a real path inside the project; symlinks are followed
        before the check, so a link pointing out of the project is refused too."""
        candidate = (self.root / relative).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise OutsideProject(f"{relative}: outside the project folder {self.root}")
        return candidate

    def relative(self, path: str | Path) -> str:
        """The project-relative spelling of a path inside the project (ids and links use it)."""
        return Path(path).resolve().relative_to(self.root).as_posix() or "."
