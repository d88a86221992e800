"""`loralab ui`'s HTTP API in-process (FastAPI's TestClient): the token on every route, paths kept
inside the project, runs and studies read from the files the CLI writes, the form's validation
equal to the CLI's, uploads through `prepare`, and jobs (queue, one-line failure, cancel, resume)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loralab.config import Config, load_config
from loralab.ui import runs as ui_runs
from loralab.ui.app import build_state, create_app
from loralab.ui.paths import OutsideProject, Project
from loralab.util.errors import LoralabError

from helpers.data import QA_ROWS
from helpers.ui import committed_copy

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token"


@pytest.fixture
def client(tmp_path):
    state = build_state(Config(), committed_copy(tmp_path / "project"), token=TOKEN)
    with TestClient(create_app(state), headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def test_every_route_refuses_a_request_without_the_token(client):
    anonymous = TestClient(client.app)
    for path in ("/", "/static/app.js", "/api/runs", "/api/form", "/files/lora/training_args.json",
                 "/playground/v1/models"):
        assert anonymous.get(path).status_code == 401, path
        assert anonymous.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert anonymous.post("/api/jobs", json={"verb": "train"}).status_code == 401
    anonymous.cookies.set("loralab_ui_token", "an-earlier-ui")  # a cookie goes to every port of the host
    page = anonymous.get("/", params={"token": TOKEN})  # the printed URL: the page sets the cookie
    assert page.status_code == 200 and "loralab" in page.text
    assert anonymous.get("/api/runs").status_code == 200  # the cookie now


def test_paths_outside_the_project_are_refused(client, tmp_path):
    root = tmp_path / "project"
    (tmp_path / "secret.txt").write_text("outside")
    (root / "link").symlink_to(tmp_path)
    for response in (
        client.get("/api/runs/detail", params={"id": "../../etc/passwd"}),
        client.get("/files/%2e%2e/secret.txt"),
        client.get("/files/link/secret.txt"),  # a symlink out of the project
        client.get("/api/data", params={"dir": "/etc"}),
        client.post("/api/jobs", json={"verb": "train", "settings": {"data.out_dir": "../../etc"}}),
        client.post("/api/jobs", json={"verb": "train", "settings": {"model.name_or_path": "/usr/lib"}}),
        client.post("/api/jobs", json={"verb": "train", "settings": {"data.dataset": "../secret.txt"}}),
        # checked as the config reads it: YAML unquotes this to /etc/passwd
        client.post("/api/jobs", json={"verb": "train", "settings": {"data.dataset": "'/etc/passwd'"}}),
    ):
        assert response.status_code == 403, response.text
        assert "outside the project" in response.json()["error"]
    with pytest.raises(OutsideProject):
        Project(root).resolve("data/../../secret.txt")


def test_the_committed_run_with_its_curve_metrics_report_and_studies(client):
    listing = client.get("/api/runs").json()
    run = next(r for r in listing["runs"] if r["id"] == "lora")
    args = json.loads((REPO / "lora" / "training_args.json").read_text())
    assert run["status"] == "done" and run["total_steps"] == args["total_steps"]
    assert run["final_eval_loss"] == args["final_eval_loss"]
    detail = client.get("/api/runs/detail", params={"id": "lora"}).json()
    assert len(detail["curve"]) == args["total_steps"] and detail["curve"][-1]["step"] == args["total_steps"]
    results = json.loads((REPO / "experiments" / "eval_results.json").read_text())
    assert detail["eval"]["fine-tuned perplexity"] == results["models"]["fine_tuned"]["perplexity"]
    assert len(detail["samples"]) == len(results["samples"]) and "<h1>" in detail["report_html"]
    kinds = {s["kind"] for s in listing["studies"]}
    assert {"compare", "tune", "sweep", "domains"} <= kinds


def test_compare_marks_the_method_with_the_lowest_eval_loss_never_a_test_number(client):
    view = client.get("/api/studies/detail", params={"id": "experiments/method_comparison.json"}).json()
    methods = json.loads((REPO / "experiments" / "method_comparison.json").read_text())["methods"]
    best = min(methods, key=lambda m: methods[m]["eval_loss"])
    assert view["table"]["rows"][view["table"]["best"]][0] == best
    assert view["chart"]["series"][0]["errors"] == [m["eval_loss_sd"] for m in methods.values()]


def test_the_form_validates_as_the_cli_does(client):
    fields = {f["key"]: f for f in client.get("/api/form").json()["fields"]}
    assert fields["lora.method"]["type"] == "choice" and "dora" in fields["lora.method"]["choices"]
    assert fields["train.learning_rate"]["type"] == "float" and fields["lora.r"]["primary"]
    for settings in ({"lora.r": 0}, {"lora.method": "lorax"}, {"train.epochs": "many"}, {"lora.dropout": 1.5}):
        answer = client.post("/api/jobs", json={"verb": "train", "settings": settings})
        key, value = next(iter(settings.items()))
        with pytest.raises(LoralabError) as cli_error:
            load_config(overrides=[f"{key}={value}"])  # as `--set key=value` spells it
        assert answer.status_code == 400 and answer.json() == {"error": str(cli_error.value)}
    refused = client.post("/api/jobs", json={"verb": "export", "settings": {}})
    assert refused.status_code == 400 and "only train, run, tune, compare" in refused.json()["error"]
    # only the form's own keys, spelled exactly: not a padded one that --set would strip, not a hidden path
    for key in ("train.nope", " data.dataset", "data.dataset=/etc/passwd #", "model.cache_dir", "train.output_dir"):
        answer = client.post("/api/jobs", json={"verb": "train", "settings": {key: "/tmp/x"}})
        assert answer.status_code == 400 and "is not a setting of the form" in answer.json()["error"], key


def test_an_upload_is_prepared_as_loralab_prepare_does_and_a_bad_one_leaves_nothing(client, tmp_path):
    root = tmp_path / "project"
    bad = client.post("/api/datasets", json={"filename": "bad.jsonl", "content": '{"question": "q"}\n'})
    assert bad.status_code == 400 and "bad.jsonl:1" in bad.json()["error"]
    assert not (root / "runs" / "ui" / "datasets" / "bad").exists()
    rows = QA_ROWS + [{"question": ["not", "text"], "answer": "x", "task": "t1"}]
    content = "".join(json.dumps(r) + "\n" for r in rows)
    good = client.post("/api/datasets", json={"filename": "qa.jsonl", "content": content, "task_field": "task",
                                              "skip_invalid": True})
    assert good.status_code == 200, good.text
    out_dir = good.json()["out_dir"]
    assert out_dir == "runs/ui/datasets/qa/data"
    view = client.get("/api/data", params={"dir": out_dir}).json()
    assert sum(view["splits"].values()) == len(QA_ROWS) and view["skipped"]["count"] == 1
    assert "question" in view["skipped"]["first"][0] and view["samples"]["train"]
    again = client.post("/api/datasets", json={"filename": "qa.jsonl", "content": content, "task_field": "task",
                                               "skip_invalid": True})
    assert again.json()["out_dir"] == "runs/ui/datasets/qa-2/data"  # a second upload never replaces the first
    assert out_dir in client.get("/api/data/dirs").json()["dirs"]


def test_reports_show_dataset_text_never_run_it(tmp_path):
    from loralab.ui.reports import render_markdown

    report = tmp_path / "report.md"
    report.write_text("# r\n\n| q |\n|---|\n| <script>alert(1)</script> |\n\n![loss](plots/loss.png)\n")
    html = render_markdown(Project(tmp_path), report)
    assert "<script>" not in html and "&lt;script&gt;" in html and 'src="/files/plots/loss.png"' in html


def test_a_resumed_log_table_keeps_the_last_line_of_each_step():
    text = ("# loralab training log\n step\t loss\t eval_loss\n 1\t 2.0\t -\n 2\t 1.5\t 1.7\n"
            "# resumed from checkpoint at step 1\n 2\t 1.4\t 1.6\n 3\t 1.2\t -\n")
    entries = ui_runs.parse_log_table(text)
    assert [(e["step"], e["loss"], e["eval_loss"]) for e in entries] == [(1, 2.0, None), (2, 1.4, 1.6), (3, 1.2, None)]
    assert ui_runs.progress(entries + [{"step": 4, "elapsed_s": 8.0, "tokens_per_s": 100.0}], 10)["step"] == 4


# --- jobs: real processes on the tiny model ------------------------------------------------------------------

@pytest.fixture
def tiny_project(tmp_path, tiny_llama_dir):
    from loralab.config import DataConfig
    from loralab.data.prepare import prepare_dataset

    root = tmp_path / "project"
    shutil.copytree(tiny_llama_dir, root / "models" / "tiny")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare_dataset(DataConfig(dataset="qa.jsonl", task_field="task", out_dir="data"))
    finally:
        os.chdir(cwd)
    return root


TINY = {"model.name_or_path": "models/tiny", "model.precision": "fp32", "train.batch_size": 4,
        "train.eval_examples": 4, "train.plot_loss": False}


def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_jobs_queue_one_at_a_time_fail_in_one_line_cancel_and_resume(tiny_project):
    state = build_state(Config(), tiny_project, token=TOKEN)
    with TestClient(create_app(state), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        long = client.post("/api/jobs", json={"verb": "train", "settings": {
            **TINY, "train.max_steps": 2000, "train.save_every": 0, "train.eval_every": 0}}).json()
        broken = client.post("/api/jobs", json={"verb": "train", "settings": {**TINY, "data.out_dir": "nodata"}}).json()
        assert broken["status"] == "queued"
        wait_for(client, long["id"], ("running",))
        run_id = long["run_id"]
        assert run_id == "runs/ui/1/lora"
        deadline = time.time() + 60
        while not (run := next((r for r in client.get("/api/runs").json()["runs"] if r["id"] == run_id), None)) \
                or not run["progress"] or run["progress"]["step"] < 2:
            assert time.time() < deadline, "the run never showed progress"
            assert client.get(f"/api/jobs/{broken['id']}").json()["status"] == "queued"  # one job at a time
            time.sleep(0.3)
        assert run["status"] == "running" and run["progress"]["total_steps"] == 2000
        assert run["progress"]["eta_s"] is not None and run["progress"]["tokens_per_s"] > 0
        client.post(f"/api/jobs/{long['id']}/cancel")
        cancelled = wait_for(client, long["id"], ("cancelled", "failed", "done"))
        assert cancelled["status"] == "cancelled", cancelled["log_tail"]
        stopped_at = next(r for r in client.get("/api/runs").json()["runs"] if r["id"] == run_id)
        assert stopped_at["status"] == "interrupted" and 0 < stopped_at["steps"] < 2000  # a checkpoint to resume from
        failed = wait_for(client, broken["id"], ("failed", "done"))
        assert failed["status"] == "failed"
        assert failed["error"].startswith("loralab: error: ") and "nodata/train_split.json: not found" in failed["error"]
        client.post(f"/api/jobs/{long['id']}/resume")
        resumed = wait_for(client, long["id"], ("running",))
        assert resumed["command"][-3:] == ["--config", "runs/ui/jobs/1/config.yaml", "--resume"]
        client.post(f"/api/jobs/{long['id']}/cancel")  # while it is still loading: it stops all the same
        assert wait_for(client, long["id"], ("cancelled", "done"), timeout=60)["status"] == "cancelled"
    resumed_log = (tiny_project / "runs/ui/1/run/log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in resumed_log]
    assert steps == list(range(1, len(steps) + 1))  # resumed where it stopped: no step lost or repeated
