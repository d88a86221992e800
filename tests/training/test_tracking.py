"""Experiment tracking (train.report_to) on tiny random models: what a run logs is read back with
TensorBoard's and MLflow's own readers and checked against the run's own log.jsonl and result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loralab.config import load_config
from loralab.pipeline import run_all
from loralab.training import tracking
from loralab.training.recipe import train
from loralab.util.errors import LoralabError

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

STEP_KEYS = ("loss", "lr", "tokens_per_s", "peak_rss_mb")


@pytest.fixture(autouse=True)
def _offline_mlflow(monkeypatch):
    # MLflow sends usage telemetry by default; these tests run offline and must not try. An
    # MLFLOW_TRACKING_URI of the machine must not redirect them either (they set the field).
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _tracked(cfg, tmp_path: Path, trackers=("tensorboard", "mlflow")):
    cfg.train.report_to = list(trackers)
    cfg.train.mlflow_tracking_uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    return cfg


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.mlflow_uri(cfg.train))


def _record(cfg) -> dict:
    return json.loads((Path(cfg.train.run_dir) / tracking.RECORD_FILE).read_text())


def _log(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.train.run_dir) / "log.jsonl").read_text().splitlines()]


def _scalars(logdir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_run_logs_its_config_steps_evaluation_and_artifacts_to_both_trackers(tiny_config, tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = _tracked(tiny_config, tmp_path)
    cfg.eval.few_shot_ks = []  # the few-shot baseline adds nothing to what is tracked
    run_all(cfg)
    log = _log(cfg)
    assert [e["step"] for e in log] == list(range(1, 7))
    expected = {key: [(e["step"], e[key]) for e in log] for key in STEP_KEYS}
    expected["eval_loss"] = [(e["step"], e["eval_loss"]) for e in log if e["eval_loss"] is not None]
    assert [step for step, _ in expected["eval_loss"]] == [3, 6]
    results = json.loads(Path(cfg.eval.results_json).read_text())
    tuned_ppl = results["models"]["fine_tuned"]["perplexity"]
    record = _record(cfg)
    assert record["step"] == 6

    # MLflow: the same numbers at the same steps, the config as params, the files as artifacts.
    client, run_id = _client(cfg), record["mlflow"]["run_id"]
    for key, points in expected.items():
        assert _history(client, run_id, key) == points, key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == str(cfg.lora.r) and run.data.params["train.report_to"] == '["tensorboard", "mlflow"]'
    assert run.data.metrics["test/fine_tuned/perplexity"] == pytest.approx(tuned_ppl)
    assert _history(client, run_id, "test/fine_tuned/perplexity")[0][0] == 6  # at the run's last step
    assert {"adapter/adapter_model.safetensors", "adapter/training_args.json"} <= {
        f.path for f in client.list_artifacts(run_id, "adapter")}
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/loss_curve.png"]
    assert {"evaluation/eval_results.json", "evaluation/report.md", "evaluation/run_summary.json"} == {
        f.path for f in client.list_artifacts(run_id, "evaluation")}
    # The local store keeps its artifacts beside the database, not in ./mlruns of the working directory.
    assert (tmp_path / "mlflow" / "mlartifacts").is_dir() and not Path("mlruns").exists()

    # TensorBoard: the event files in the run directory, read by TensorBoard's own loader.
    logdir = Path(cfg.train.run_dir) / "tensorboard"
    assert record["tensorboard"]["logdir"] == str(logdir)
    scalars, events = _scalars(logdir)
    for key, points in expected.items():  # event files hold float32
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in points], rel=1e-6), key
    assert scalars["test/fine_tuned/perplexity"] == [(6, pytest.approx(tuned_ppl, rel=1e-6))]
    assert "plots/loss_curve" in events.Tags()["images"]
    text = events.Tensors("evaluation/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == Path(cfg.eval.report_md).read_text()  # report.md as a text panel
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lora.r"].number_value == cfg.lora.r
    assert start.hparams["model.name_or_path"].string_value == cfg.model.name_or_path


def test_a_resumed_run_continues_its_tracked_run(tiny_config, tmp_path):
    cfg = _tracked(tiny_config, tmp_path)
    cfg.train.save_every = 2
    first = train(cfg, stop_at_step=3, quiet=True)
    assert first.interrupted
    client, run_id = _client(cfg), _record(cfg)["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    train(cfg, resume=True, quiet=True)
    assert _record(cfg)["mlflow"]["run_id"] == run_id  # the same run, not a second one
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = [(e["step"], e["loss"]) for e in _log(cfg)]
    assert [s for s, _ in expected] == list(range(1, 7))
    assert _history(client, run_id, "loss") == expected
    scalars, _ = _scalars(Path(cfg.train.run_dir) / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 7))  # no step twice

    train(cfg, quiet=True)  # a fresh run (no --resume) is a new tracked run and replaces the curves
    assert _record(cfg)["mlflow"]["run_id"] != run_id
    scalars, _ = _scalars(Path(cfg.train.run_dir) / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 7))


def test_tune_trials_are_nested_runs_of_the_study(tiny_config, tmp_path):
    from loralab.studies.tune import tune

    cfg = _tracked(tiny_config, tmp_path)
    cfg.train.tracking_dir = str(tmp_path / "tb")
    tc = cfg.tune
    tc.space, tc.sampler, tc.pruner = {"lora.r": [2, 4]}, "grid", "none"
    tc.storage, tc.runs_dir, tc.results_dir = f"sqlite:///{tmp_path}/study.db", str(tmp_path / "tune"), str(tmp_path)
    tc.trial_examples, tc.trial_eval_examples = 16, 8
    summary = tune(cfg)
    assert summary["counts"] == {"COMPLETE": 2}

    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.train.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.STUDY_TAG) == f"tune/{tc.study_name}"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["tune.sampler"] == "grid"
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {"tuning_summary.md", "metrics_comparison.json"}
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
    by_name = {r.info.run_name: r for r in children}
    assert sorted(by_name) == ["trial-0000", "trial-0001"] and len(runs) == 3
    for trial in summary["trials"]:
        child = by_name[f"trial-{trial['number']:04d}"]
        assert child.data.params["lora.r"] == str(trial["params"]["lora.r"])
        assert child.data.metrics["eval_loss"] == pytest.approx(trial["eval_loss"], rel=1e-4)
        # TensorBoard: one directory per trial under the study's
        scalars, _ = _scalars(tmp_path / "tb" / "tune" / tc.study_name / f"trial-{trial['number']:04d}")
        assert scalars["eval_loss"][-1][1] == pytest.approx(trial["eval_loss"], rel=1e-4)


def test_bad_report_to_and_a_missing_tracker_fail_in_one_line(tiny_config, tmp_path, monkeypatch):
    for value, expected in (("[wandb]", "train.report_to='wandb': expected one of tensorboard, mlflow"),
                            ("tensorboard", "expected a list"),
                            ("[mlflow, mlflow]", "name each tracker once")):
        with pytest.raises(LoralabError, match="train.report_to") as caught:
            load_config(overrides=[f"train.report_to={value}"])
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  report_to: [tensorboard, comet]\n")
    with pytest.raises(LoralabError, match="report_to='comet': expected one of tensorboard, mlflow"):
        load_config(config)

    monkeypatch.setattr(tracking, "find_spec", lambda name: None if name == "mlflow" else object())
    with pytest.raises(LoralabError, match=r"names mlflow, which is not installed: pip install mlflow==") as caught:
        train(_tracked(tiny_config, tmp_path, ["mlflow"]), quiet=True)
    assert "\n" not in str(caught.value)
    assert not Path(tiny_config.train.output_dir).exists()


def test_no_tracker_logs_nothing_and_the_mlflow_store_is_chosen_in_order(tiny_config, tmp_path, monkeypatch):
    assert tiny_config.train.report_to == []
    tracker = tracking.open_run(tiny_config, tmp_path / "run", 0)
    assert tracker.backends == {} and not (tmp_path / "run").exists()

    t = tiny_config.train
    monkeypatch.chdir(tmp_path)
    assert tracking.mlflow_uri(t) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # made absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker.example:5000")
    assert tracking.mlflow_uri(t) == "http://tracker.example:5000"  # the environment, when the field is unset
    t.mlflow_tracking_uri = "http://shared:5000"
    assert tracking.mlflow_uri(t) == "http://shared:5000"  # the field, when set


def _runs(cfg) -> list:
    client = _client(cfg)
    return client.search_runs([client.get_experiment_by_name(cfg.train.experiment_name).experiment_id])


def test_evaluate_alone_joins_its_training_run_or_opens_one_for_another_adapter(tiny_config, tmp_path):
    import shutil

    import yaml

    from loralab.cli import main

    cfg = _tracked(tiny_config, tmp_path)
    cfg.eval.few_shot_ks, cfg.eval.recall_per_task = [], 0
    train(cfg, quiet=True)
    config = tmp_path / "tracked.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["evaluate", "--config", str(config)]) == 0  # the run's own adapter: into the training's run
    client, run_id = _client(cfg), _record(cfg)["mlflow"]["run_id"]
    results = json.loads(Path(cfg.eval.results_json).read_text())
    tuned_ppl = results["models"]["fine_tuned"]["perplexity"]
    assert _history(client, run_id, "test/fine_tuned/perplexity") == [(6, pytest.approx(tuned_ppl))]
    assert len(_runs(cfg)) == 1

    other = tmp_path / "elsewhere" / "my_adapter"
    shutil.copytree(cfg.train.output_dir, other)
    assert main(["evaluate", "--config", str(config), "--adapter", str(other)]) == 0  # not the run's: a run of its own
    (own,) = [r for r in _runs(cfg) if r.info.run_id != run_id]
    assert own.info.run_name == "evaluate my_adapter" and own.info.status == "FINISHED"
    assert own.data.tags[tracking.ADAPTER_TAG] == str(other.resolve()) and own.data.params["lora.r"] == str(cfg.lora.r)
    again = json.loads(Path(cfg.eval.results_json).read_text())["models"]["fine_tuned"]["perplexity"]
    assert own.data.metrics["test/fine_tuned/perplexity"] == pytest.approx(again)
    assert {"evaluation/eval_results.json", "evaluation/report.md"} == {
        f.path for f in client.list_artifacts(own.info.run_id, "evaluation")}
    scalars, _ = _scalars(Path(cfg.train.run_dir) / "evaluations" / "my_adapter")
    assert scalars["test/fine_tuned/perplexity"] == [(0, pytest.approx(again, rel=1e-6))]
    assert len(_history(client, run_id, "test/fine_tuned/perplexity")) == 1  # the training's run is untouched


def test_sweep_points_are_nested_runs_with_their_measurement(tiny_config, tmp_path):
    from loralab.studies.sweep import sweep

    cfg = _tracked(tiny_config, tmp_path, ["mlflow"])
    sc = cfg.sweep
    sc.runs_dir, sc.results_dir, sc.train_examples, sc.eval_examples = str(tmp_path / "sweep"), str(tmp_path), 16, 8
    sc.factors, sc.generation_per_task = {"lora.r": [2, 4]}, 1
    summary = sweep(cfg)
    runs = _runs(cfg)
    (parent,) = [r for r in runs if r.data.tags.get(tracking.STUDY_TAG) == "sweep/sweep"]
    assert parent.info.status == "FINISHED"
    assert {f.path for f in _client(cfg).list_artifacts(parent.info.run_id)} >= {"sensitivity.json", "sensitivity.md"}
    children = {r.info.run_name: r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id}
    assert sorted(children) == ["lora.r=2", "lora.r=4"] and len(runs) == 3
    for point in summary["points"]:
        child = children[f"lora.r={point['resolved']}"]
        assert child.data.params["lora.r"] == str(point["resolved"])
        assert child.data.metrics["eval/fine_tuned/perplexity"] == pytest.approx(point["eval_perplexity"])
