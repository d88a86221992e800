"""A throwaway PostgreSQL server on loopback for the distributed-search tests.

initdb and pg_ctl in a temporary directory, on a free port, removed afterwards. PostgreSQL refuses
to run as root, so as root (CI) the server runs as Debian's `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loralab.util.net import free_port

INSTALL_HINT = "PostgreSQL server binaries not found: install them with `apt-get install postgresql` (.ci/run does)"


def find_bin_dir() -> Path | None:
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


@contextmanager
def throwaway_server(bin_dir: Path) -> Iterator[str]:
    """Yield a postgresql:// URL of a fresh database; stop and delete the server afterwards."""
    root = Path(tempfile.mkdtemp(prefix="loralab-pg-"))
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:  # the server refuses root; Debian's package creates the `postgres` user
        shutil.chown(root, user="postgres", group="postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, cwd=root)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "loralab", "--auth=trust", "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start",
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=50 -c fsync=off")
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "loralab", "tune")
        yield f"postgresql://loralab@127.0.0.1:{port}/tune"
    finally:
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, cwd=root
        )
        shutil.rmtree(root, ignore_errors=True)
