"""The verb table: every flag lands on a real config field, flags win over files, presets ship
with the package, and errors are one line with exit code 2."""

import ast
import dataclasses
import inspect

import pytest
import yaml

from loralab import cli
from loralab.cli import VERBS, build_parser, load_verb_config, main
from loralab.config import PRESETS, QUICK_PRESET, Config


def _config_for(argv: list[str]) -> Config:
    args = build_parser().parse_args(argv)
    return load_verb_config(next(v for v in VERBS if v.name == args.verb), args)


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v.name)
def test_every_flag_sets_a_field_config_has(verb):
    fields = {f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
              for f in dataclasses.fields(section.default_factory())}
    missing = [option.sets for option in verb.flags if option.sets is not None and option.sets not in fields]
    assert not missing, f"loralab {verb.name}: flags set fields Config does not have: {missing}"


def test_every_config_value_a_verb_reports_exists():
    """A verb prints where it wrote (cfg.section.key): a renamed field must fail here, not after hours of work."""
    tree = ast.parse(inspect.getsource(cli))
    used = {(node.value.attr, node.attr) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name) and node.value.value.id == "cfg"}
    assert used
    cfg = Config()
    assert [f"{s}.{k}" for s, k in sorted(used) if not hasattr(getattr(cfg, s, None), k)] == []


def test_verb_names_are_unique_and_all_reachable():
    names = [verb.name for verb in VERBS]
    assert len(names) == len(set(names))
    for name in names:
        assert build_parser().parse_args([name]).verb == name


def test_flags_override_files_and_are_taken_literally(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: builtin:legal\n  out_dir: elsewhere\n")
    cfg = _config_for(["prepare", "--config", str(path), "--dataset", "2024-05-01.jsonl", "--skip-invalid",
                       "--question-field", "true"])
    assert (cfg.data.dataset, cfg.data.out_dir, cfg.data.skip_invalid, cfg.data.question_field) == \
        ("2024-05-01.jsonl", "elsewhere", True, "true")
    assert _config_for(["prepare"]).data.skip_invalid is False  # an absent flag leaves the config alone


def test_serve_export_and_tune_flags():
    cfg = _config_for(["serve", "--adapter", "a=x", "--adapter", "b=y=z", "--port", "9", "--merged", "m"])
    assert (cfg.serve.adapters, cfg.serve.port, cfg.serve.merged_model) == ({"a": "x", "b": "y=z"}, 9, "m")
    cfg = _config_for(["export", "--no-evaluate", "--out", "o"])
    assert (cfg.export.evaluate, cfg.export.out_dir) == (False, "o")
    assert _config_for(["export"]).export.evaluate is True
    cfg = _config_for(["tune", "--n-trials", "3", "--sampler", "grid", "--timeout-minutes", "1.5"])
    assert (cfg.tune.n_trials, cfg.tune.sampler, cfg.tune.timeout_minutes) == (3, "grid", 1.5)


def test_quick_preset_ships_inside_the_package():
    assert QUICK_PRESET.is_file() and QUICK_PRESET.name == "quick.yaml"
    assert str(PRESETS).endswith("presets")
    assert _config_for(["config", "--quick"]).train.output_dir.startswith("runs/quick/")


def test_config_prints_yaml_and_errors_are_one_line(capsys):
    assert main(["config", "--quick", "--set", "train.seed=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["seed"] == 7
    assert main(["serve", "--adapter", "nodir"]) == 2
    assert capsys.readouterr().err == "loralab: error: --adapter expects NAME=DIR, e.g. --adapter medical=lora\n"
