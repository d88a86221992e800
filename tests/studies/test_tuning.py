"""`loralab tune` (Optuna) and `loralab sweep` on the tiny model: search, pruning, resume after a
kill, two workers sharing one study on a real PostgreSQL server, and every bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loralab.config import load_config
from loralab.studies.space import grid_points, parse_space
from loralab.studies.sweep import sweep, sweep_points
from loralab.studies.tune import report_only, tune
from loralab.util.errors import LoralabError

from helpers.postgres_server import INSTALL_HINT, find_bin_dir, throwaway_server

GRID = {"train.learning_rate": [1e-3, 5e-2], "lora.r": [2, 4]}


def _tune_outputs(cfg, root: Path, storage: str | None = None):
    tc = cfg.tune
    tc.storage = storage or f"sqlite:///{root}/study.db"
    tc.runs_dir = str(root / "tune")
    tc.results_dir = str(root)
    tc.trial_examples = 32  # batch 4: 8 steps
    tc.trial_eval_examples = 8
    tc.startup_trials = 2
    sc = cfg.sweep
    sc.runs_dir = str(root / "sweep")
    sc.results_dir = str(root)
    sc.train_examples, sc.eval_examples = 32, 8  # its own budget, given to the runner: not tune's
    return cfg


@pytest.fixture
def tune_config(tiny_config, tmp_path):
    return _tune_outputs(tiny_config, tmp_path)


_STORAGES: dict = {}


def _states(cfg) -> list:
    """The study's trials as stored (one storage object per URL: each new one opens a connection pool)."""
    import optuna

    if cfg.tune.storage not in _STORAGES:
        _STORAGES[cfg.tune.storage] = optuna.storages.RDBStorage(cfg.tune.storage)
    storage = _STORAGES[cfg.tune.storage]
    try:
        return optuna.load_study(study_name=cfg.tune.study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def test_tpe_search_prunes_records_costs_and_writes_a_usable_best_config(tune_config):
    tune_config.tune.space = {"train.learning_rate": {"low": 1e-3, "high": 5e-2, "log": True}, "lora.r": [2, 4],
                              "lora.alpha_ratio": [1, 2], "lora.target_modules": ["auto", "q_proj,v_proj"]}
    tune_config.tune.n_trials = 8
    summary = tune(tune_config)
    assert sum(summary["counts"].get(s, 0) for s in ("COMPLETE", "PRUNED")) == 8
    complete = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert summary["best"]["eval_loss"] == min(t["eval_loss"] for t in complete)
    for trial in complete:
        assert trial["steps"] == 8 and trial["trainable_parameters"] > 0 and trial["adapter_mb"] > 0
        assert trial["tokens_per_s"] > 0 and trial["peak_rss_mb"] > 0 and len(trial["intermediate_eval_loss"]) == 3
        assert trial["lora_alpha"] == trial["params"]["lora.alpha_ratio"] * trial["params"]["lora.r"]
    best = load_config(tune_config.tune.best_config_yaml)  # accepted unchanged by --config
    assert best.train.learning_rate == summary["best"]["params"]["train.learning_rate"]
    assert best.lora.r == summary["best"]["params"]["lora.r"] and best.train.max_steps == tune_config.train.max_steps
    for name in ("optimization_history", "param_importances", "slices", "contour_lr_rank"):
        assert (Path(tune_config.tune.plots_dir) / f"{name}.png").stat().st_size > 1000
    table = Path(tune_config.tune.summary_md).read_text()
    assert f"**Best: trial {summary['best']['number']}**" in table and table.count("\n| ") >= 9
    for trial in summary["trials"]:
        if trial["state"] == "PRUNED":  # its last intermediate loss is not passed off as a final one
            assert trial["eval_loss"] is None and trial["last_intermediate_eval_loss"] > 0
    # The budget is the study's: a second run with the same budget has nothing left to do.
    again = tune(tune_config)
    assert len(again["trials"]) == len(summary["trials"])
    Path(tune_config.tune.summary_md).unlink()
    assert report_only(tune_config)["best"] == summary["best"] and Path(tune_config.tune.summary_md).is_file()


def test_grid_sampler_runs_each_point_once_and_hyperband_prunes(tune_config):
    tune_config.tune.space = GRID
    tune_config.tune.sampler = "grid"
    tune_config.tune.pruner = "none"
    summary = tune(tune_config)
    assert summary["counts"] == {"COMPLETE": 4}
    assert sorted(json.dumps(t["params"], sort_keys=True) for t in summary["trials"]) == \
        sorted(json.dumps(p, sort_keys=True) for p in grid_points(parse_space(GRID, tune_config)))
    assert summary["best"]["params"]["train.learning_rate"] == 5e-2  # the tiny model learns only with a large step


def _cli_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _running_trial_of(cfg, pid: int, after_complete: int = 0):
    """The worker's trial in progress (past its first report), once it has finished `after_complete`."""
    def check():
        mine = [t for t in _states(cfg) if t.user_attrs.get("worker", "").endswith(f":{pid}")]
        if sum(t.state.name == "COMPLETE" for t in mine) < after_complete:
            return None
        return next((t for t in mine if t.state.name == "RUNNING" and t.intermediate_values), None)

    return check


def _tune_process(config_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loralab", "tune", "--config", str(config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _slow_trials(cfg):
    """Trials long enough to be killed in the middle, and a dead worker noticed within seconds."""
    cfg.tune.trial_examples = 240  # 60 steps
    cfg.tune.reports_per_trial = 6
    cfg.tune.heartbeat_seconds = 1
    cfg.tune.grace_seconds = 3
    cfg.tune.pruner = "none"  # every trial must run to its end here
    return cfg


def test_a_killed_search_continues_where_it_stopped_and_resumes_the_killed_trial(tune_config, tmp_path):
    cfg = _slow_trials(tune_config)
    cfg.tune.space = GRID
    cfg.tune.sampler = "grid"
    config_path = _cli_config(cfg, tmp_path / "tune.yaml")
    first = _tune_process(config_path)
    killed = _wait_for(_running_trial_of(cfg, first.pid), 120, "a trial in progress")
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(cfg.tune.grace_seconds + 1)  # the dead trial's heartbeat is now stale
    second = subprocess.run([sys.executable, "-m", "loralab", "tune", "--config", str(config_path)],
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"(continues trial {killed.number})" in second.stdout  # its checkpoint was reused, not retrained
    trials = _states(cfg)
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE"] * 4 + ["FAIL"]
    complete = [json.dumps(t.params, sort_keys=True) for t in trials if t.state.name == "COMPLETE"]
    assert len(set(complete)) == 4 and json.dumps(killed.params, sort_keys=True) in complete


def test_ctrl_c_requeues_the_trial_and_the_next_run_resumes_it(tune_config, tmp_path):
    cfg = _slow_trials(tune_config)
    cfg.tune.space = {"train.learning_rate": [5e-2], "lora.r": [2]}
    cfg.tune.n_trials = 1
    config_path = _cli_config(cfg, tmp_path / "tune.yaml")
    first = _tune_process(config_path)
    _wait_for(_running_trial_of(cfg, first.pid), 120, "a trial in progress")
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=60)
    assert first.returncode == 130, output
    again = subprocess.run([sys.executable, "-m", "loralab", "tune", "--config", str(config_path)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "(continues trial 0)" in again.stdout, again.stdout + again.stderr
    assert sorted(t.state.name for t in _states(cfg)) == ["COMPLETE", "FAIL"]


@pytest.fixture(scope="module")
def postgres_url():
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    with throwaway_server(bin_dir) as url:
        yield url


def test_two_workers_share_one_postgres_study_and_survive_a_killed_worker(tiny_config, tmp_path, postgres_url):
    cfg = _slow_trials(_tune_outputs(tiny_config, tmp_path, storage=postgres_url))
    cfg.tune.space = {"train.learning_rate": [1e-3, 5e-2], "lora.r": [2, 4, 8]}
    cfg.tune.sampler = "grid"
    cfg.tune.study_name = "two-workers"
    config_path = _cli_config(cfg, tmp_path / "tune.yaml")
    victim, survivor = _tune_process(config_path), _tune_process(config_path)
    killed = _wait_for(_running_trial_of(cfg, victim.pid, after_complete=1), 180, "the first worker's second trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    output, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, output
    trials = _states(cfg)
    by_state: dict[str, list] = {}
    for t in trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert set(by_state) <= {"COMPLETE", "FAIL"}, {s: len(v) for s, v in by_state.items()}  # nothing left RUNNING
    complete = [json.dumps(t.params, sort_keys=True) for t in by_state["COMPLETE"]]
    grid = [json.dumps(p, sort_keys=True) for p in grid_points(parse_space(cfg.tune.space, cfg))]
    assert sorted(complete) == sorted(grid)  # every point once: none lost, none duplicated
    assert [t.number for t in by_state["FAIL"]] == [killed.number]
    assert len({t.user_attrs["worker"] for t in by_state["COMPLETE"]}) == 2  # both workers did real work
    summary = json.loads(Path(cfg.tune.results_json).read_text())
    assert summary["storage"] == postgres_url and summary["counts"] == {"COMPLETE": 6, "FAIL": 1}


@pytest.mark.parametrize("space, message", [
    ({}, "empty"),
    ({"lora.r": []}, "empty list of choices"),
    ({"lora.rank": [4]}, "unknown key 'rank'"),
    ({"train.learning_rate": {"low": 1e-2, "high": 1e-3}}, "empty or inverted range"),
    ({"train.learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "log range needs low > 0"),
    ({"lora.r": ["four"]}, "expected an integer"),
])
def test_bad_search_spaces_fail_before_any_training(tune_config, space, message):
    tune_config.tune.space = space
    with pytest.raises(LoralabError, match=message):
        tune(tune_config)
    assert not Path(tune_config.tune.runs_dir).exists()


def test_grid_sampler_refuses_ranges_and_bad_storage_fails_in_one_line(tune_config):
    tune_config.tune.space = {"train.learning_rate": {"low": 1e-3, "high": 1e-2}}
    tune_config.tune.sampler = "grid"
    with pytest.raises(LoralabError, match="needs a list of values"):
        tune(tune_config)
    tune_config.tune.space = GRID
    tune_config.tune.storage = "postgresql://someone:secret@127.0.0.1:1/nothing"
    with pytest.raises(LoralabError, match="cannot open it") as error:
        tune(tune_config)
    assert "secret" not in str(error.value)


def test_a_study_with_another_search_space_is_refused_and_left_intact(tune_config):
    tune_config.tune.space = {"train.learning_rate": [5e-2], "lora.r": [2]}
    tune_config.tune.n_trials = 1
    tune(tune_config)
    before = [(t.number, t.state.name, t.value) for t in _states(tune_config)]
    tune_config.tune.space = {"train.learning_rate": [5e-2], "lora.r": [4]}
    with pytest.raises(LoralabError, match="was made with another space"):
        tune(tune_config)
    tune_config.tune.space = {"train.learning_rate": [5e-2], "lora.r": [2]}
    assert [(t.number, t.state.name, t.value) for t in _states(tune_config)] == before


def test_sweep_measures_each_point_once_and_continues_after_a_rerun(tune_config, capsys):
    tune_config.sweep.factors = {"lora.r": [2, 8], "train.learning_rate": ["x1", "x10"]}
    tune_config.sweep.generation_per_task = 2
    tune_config.lora.r = 8
    points = sweep_points(tune_config)
    assert [p[2] for p in points] == [{"lora.r": 2}, {"lora.r": 8}, {"train.learning_rate": 5e-3}, {"train.learning_rate": 5e-2}]
    summary = sweep(tune_config)
    out = capsys.readouterr().out
    assert out.count("point ") == 3  # r=8 and lr x1 are the same configuration: trained once
    by_point = {(p["factor"], p["resolved"]): p for p in summary["points"]}
    assert by_point[("lora.r", 8)]["eval_perplexity"] == by_point[("train.learning_rate", 5e-3)]["eval_perplexity"]
    assert by_point[("lora.r", 2)]["trainable_parameters"] < by_point[("lora.r", 8)]["trainable_parameters"]
    for p in summary["points"]:
        assert p["eval_perplexity"] > 1 and 0 <= p["domain_accuracy"] <= 100 and p["adapter_mb"] > 0
    assert Path(tune_config.sweep.plot).stat().st_size > 1000
    sweep(tune_config)
    assert "point " not in capsys.readouterr().out  # every point was already measured


@pytest.mark.parametrize("factor, message", [({"lora.rank": [1]}, "unknown key"), ({"lora.r": []}, "non-empty list"),
                                             ({"lora.target_modules": ["x2"]}, "needs a numeric setting")])
def test_bad_sweeps_fail_before_any_training(tune_config, factor, message):
    tune_config.sweep.factors = factor
    with pytest.raises(LoralabError, match=message):
        sweep(tune_config)
