"""`loralab serve` as a real process for the tests."""

import os
import subprocess
import sys
import time
import urllib.request

import yaml

from loralab.util.net import free_port


def start_server(model_dir, root, api_key: str | None = None, **serve) -> tuple[subprocess.Popen, str]:
    """`loralab serve` on `model_dir` in fp32 with `serve` settings (the torch engine and no adapters
    unless given), once /health answers; its output goes to root/server.log."""
    port = free_port()
    config = {"model": {"name_or_path": str(model_dir), "cache_dir": str(root / "models"), "precision": "fp32"},
              "serve": {"port": port, "engine": "torch", "adapters": {}, "max_tokens_limit": 512, "max_batch": 8, **serve}}
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "LORALAB_API_KEY"} | ({"LORALAB_API_KEY": api_key} if api_key else {})
    with open(root / "server.log", "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-m", "loralab", "serve", "--config", str(root / "serve.yaml")],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return process, url
        except OSError:
            assert process.poll() is None, (root / "server.log").read_text()
            time.sleep(0.2)
    raise AssertionError("server did not start")
