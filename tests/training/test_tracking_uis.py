"""The trackers' own UIs show a loralab run: TensorBoard and the MLflow UI, started as docs/tracking.md tells a
user to (`tensorboard --logdir ...`, `mlflow ui --backend-store-uri ...`), serve the run's curves and the run itself
over the HTTP APIs their web pages read."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loralab.training import tracking
from loralab.training.recipe import train
from loralab.util.net import free_port

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _serve(command: list[str], url: str, log: Path, timeout_s: float = 120) -> subprocess.Popen:
    """`command` as a process, once `url` answers; its output goes to `log`."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return process
        except OSError:
            assert process.poll() is None, log.read_text()
            time.sleep(0.5)
    process.terminate()
    raise AssertionError(f"{command[0]} did not answer {url}: {log.read_text()[-2000:]}")


def _get(url: str, payload: dict | None = None) -> object:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_and_the_mlflow_ui_show_a_tracked_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg = tiny_config
    cfg.train.report_to = ["tensorboard", "mlflow"]
    cfg.train.mlflow_tracking_uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    train(cfg, quiet=True)
    log = [json.loads(line) for line in (Path(cfg.train.run_dir) / "log.jsonl").read_text().splitlines()]
    losses = [(entry["step"], entry["loss"]) for entry in log]
    run_id = json.loads((Path(cfg.train.run_dir) / tracking.RECORD_FILE).read_text())["mlflow"]["run_id"]
    bin_dir = Path(sys.executable).parent
    servers = []
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        servers.append(_serve([str(bin_dir / "tensorboard"), "--logdir", cfg.train.run_dir, "--host", "127.0.0.1",
                               "--port", str(port)], url + "/data/runs", tmp_path / "tensorboard.log"))
        tags = _get(url + "/data/plugin/scalars/tags")
        assert list(tags) == ["tensorboard"] and {"loss", "eval_loss", "lr"} <= set(tags["tensorboard"])
        points = _get(url + "/data/plugin/scalars/scalars?run=tensorboard&tag=loss")  # [wall time, step, value]
        assert [(step, value) for _, step, value in points] == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        servers.append(_serve([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", cfg.train.mlflow_tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port)], url + "/health", tmp_path / "mlflow.log"))
        with urllib.request.urlopen(url + "/", timeout=30) as page:
            assert b"MLflow" in page.read()  # the web UI itself, not only its API
        experiment = _get(url + f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={cfg.train.experiment_name}")
        found = _get(url + "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment"]["experiment_id"]]})
        assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]
        history = _get(url + f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss")["metrics"]
        assert sorted((m["step"], m["value"]) for m in history) == [(s, pytest.approx(v)) for s, v in losses]
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
