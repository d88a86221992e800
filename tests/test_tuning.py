import json
from pathlib import Path

import pytest
import yaml

from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.tuning import grid_trials, tune


def test_grid_is_the_cartesian_product():
    trials = grid_trials({"train.learning_rate": [1e-4, 1e-3], "lora.r": [4, 8, 16]})
    assert len(trials) == 6 and {"train.learning_rate": 1e-3, "lora.r": 16} in trials


@pytest.mark.parametrize("grid, message", [({}, "empty"), ({"lora.r": []}, "non-empty list"), ({"lora.rank": [4]}, "unknown key 'rank'")])
def test_bad_grids_fail_before_any_training(tiny_config, grid, message):
    tiny_config.tune.grid = grid
    with pytest.raises(LoralabError, match=message):
        tune(tiny_config)


def test_tune_records_every_trial_skips_finished_ones_and_writes_a_usable_best_config(tiny_config, tmp_path, capsys):
    tiny_config.tune.grid = {"train.learning_rate": [1e-4, 5e-2], "lora.r": [2]}
    tiny_config.tune.trial_examples = 16  # batch 4: 4 steps
    tiny_config.tune.trial_eval_examples = 8
    tiny_config.tune.runs_dir = str(tmp_path / "tune")
    tiny_config.tune.results_json = str(tmp_path / "metrics_comparison.json")
    tiny_config.tune.best_config_yaml = str(tmp_path / "best.yaml")
    summary = tune(tiny_config)
    assert summary["complete"] and len(summary["trials"]) == 2
    assert summary["best"]["params"]["train.learning_rate"] == 5e-2  # the tiny model learns only with a large step
    for trial in summary["trials"]:
        assert trial["steps"] == 4
        assert trial["eval_loss"] > 0 and trial["trainable_parameters"] > 0 and trial["wall_seconds"] > 0
    best = load_config(tiny_config.tune.best_config_yaml)  # accepted unchanged by --config
    assert best.train.learning_rate == 5e-2 and best.lora.r == 2
    assert yaml.safe_load(Path(tiny_config.tune.best_config_yaml).read_text())["lora"]["r"] == 2
    capsys.readouterr()
    again = tune(tiny_config)  # nothing left to run: finished trials are kept, not retrained
    assert "trial 1/2" not in capsys.readouterr().out
    assert json.dumps(again["trials"]) == json.dumps(summary["trials"])
