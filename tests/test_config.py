import pytest

from loralab.cli import main
from loralab.config import QUICK_PRESET, Config, MethodName, TrainConfig, choices, load_config, run_digest, run_identity
from loralab.util.errors import LoralabError


def test_defaults_without_files():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name_or_path == "smollm2-135m-instruct"


def test_yaml_then_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-3\n  batch_size: 4\nlora:\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(path, overrides=["train.batch_size=2", "train.learning_rate=3e-4", "model.gradient_checkpointing=true"])
    assert cfg.train.learning_rate == pytest.approx(3e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 2
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.gradient_checkpointing is True


def test_later_files_win(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  max_steps: 10\n  seed: 1\n")
    b.write_text("train:\n  max_steps: 20\n")
    cfg = load_config(a, b)
    assert (cfg.train.max_steps, cfg.train.seed) == (20, 1)


def test_quick_preset_loads_and_keeps_outputs_out_of_committed_paths():
    cfg = load_config(QUICK_PRESET)
    assert cfg.train.max_steps > 0
    for path in (cfg.data.out_dir, cfg.train.output_dir, cfg.train.log_file, cfg.train.loss_plot, cfg.eval.report_md,
                 cfg.eval.results_json, cfg.tune.storage.removeprefix("sqlite:///"), cfg.tune.runs_dir, cfg.tune.results_json,
                 cfg.tune.best_config_yaml, cfg.sweep.runs_dir, cfg.sweep.results_json, cfg.sweep.plot, cfg.export.out_dir,
                 cfg.export.report_json, cfg.compare.runs_dir, cfg.compare.records_dir, cfg.compare.results_json,
                 cfg.compare.summary_md, cfg.compare.plots_dir, cfg.domains.runs_dir, cfg.domains.results_json,
                 cfg.domains.summary_md, cfg.domains.plots_dir):
        assert path.startswith("runs/quick/")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rat=1", "unknown key 'learning_rat'"),
        ("trian.seed=1", "unknown section 'trian'"),
        ("train.batch_size=two", "expected an integer"),
        ("train.batch_size", "expected section.key=value"),
        ("model.gradient_checkpointing=maybe", "expected true/false"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(LoralabError, match=message):
        load_config(overrides=[override])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  seed: 1\n  lr: [1, 2\n")
    with pytest.raises(LoralabError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_cli_config_verb_prints_resolved_yaml(capsys):
    assert main(["config", "--set", "train.seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out


def test_cli_reports_errors_in_one_line_with_exit_2(capsys):
    assert main(["config", "--set", "nope.x=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loralab: error:") and "\n" not in err


def test_default_output_files_stay_where_the_committed_results_are():
    cfg = Config()
    assert (cfg.train.log_file, cfg.train.loss_plot) == ("experiments/training_logs.txt", "experiments/plots/loss_curve.png")
    assert (cfg.eval.results_json, cfg.eval.report_md, cfg.eval.plots_dir, cfg.eval.run_summary_json) == (
        "experiments/eval_results.json", "experiments/report.md", "experiments/plots", "experiments/run_summary.json")
    assert (cfg.tune.results_json, cfg.tune.summary_md, cfg.tune.best_config_yaml, cfg.tune.plots_dir) == (
        "experiments/metrics_comparison.json", "experiments/tuning_summary.md", "experiments/best_config.yaml",
        "experiments/plots/tune")
    assert (cfg.sweep.results_json, cfg.sweep.summary_md, cfg.sweep.plot, cfg.sweep.runs_dir) == (
        "experiments/sensitivity.json", "experiments/sensitivity.md", "experiments/plots/sensitivity.png", "runs/tune/sweep")
    assert (cfg.export.report_md, cfg.export.report_json) == ("experiments/export_report.md", "experiments/export_report.json")
    assert (cfg.compare.records_dir, cfg.compare.results_json, cfg.compare.summary_md, cfg.compare.plots_dir) == (
        "experiments/compare_runs", "experiments/method_comparison.json", "experiments/method_comparison.md",
        "experiments/plots/compare")
    assert (cfg.domains.results_json, cfg.domains.summary_md, cfg.domains.plots_dir) == (
        "experiments/domain_transfer.json", "experiments/domain_transfer.md", "experiments/plots/domains")
    assert (cfg.inject.results_json, cfg.inject.summary_md, cfg.inject.plot) == (
        "experiments/knowledge_injection.json", "experiments/knowledge_injection.md", "experiments/plots/knowledge_injection.png")
    assert Config(train=TrainConfig(plot_loss=False)).train.loss_plot == ""


def test_committed_configs_load():
    for path in ("configs/grid.yaml", "configs/retrain_best.yaml", "experiments/best_config.yaml"):
        load_config(path)
    assert load_config("configs/grid.yaml").tune.results_json == "experiments/grid/metrics_comparison.json"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.precision=fp33", r"^--set model.precision='fp33': expected one of auto, bf16, fp32$"),
        ("data.format=xml", "data.format='xml': expected one of auto, jsonl"),
        ("model.quantize_base=int4", "expected one of none, int8, nf4"),
        ("lora.method=superlora", "lora.method='superlora': expected one of lora, rslora"),
        ("train.lr_scheduler=cosine_with_min_lr", "expected one of linear, cosine"),
        ("eval.split=dev", "expected one of train, eval, test"),
        ("tune.sampler=cmaes", "expected one of tpe, grid, random"),
        ("tune.pruner=asha", "expected one of median, hyperband, none"),
        ("export.formats=[merged, gguf-q9]", "export.formats='gguf-q9': expected one of merged"),
    ],
)
def test_enumerated_values_are_checked_at_load(override, message):
    with pytest.raises(LoralabError, match=message):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=0", r"^train.batch_size=0: must be at least 1$"),
        ("train.learning_rate=0", "train.learning_rate=0.0: must be greater than 0"),
        ("train.warmup_ratio=1.5", r"train.warmup_ratio=1.5: must be in \[0, 1\]"),
        ("data.eval_fraction=1", r"data.eval_fraction=1.0: must be in \[0, 1\)"),
        ("data.test_fraction=0.95", "data.eval_fraction \\+ data.test_fraction"),
        ("lora.dropout=1", "lora.dropout=1.0"),
        ("lora.r=0", "lora.r=0: must be at least 1"),
        ("tune.grace_seconds=5", "tune.grace_seconds=5: must be larger than tune.heartbeat_seconds"),
        ("sweep.generation_per_task=0", "sweep.generation_per_task=0"),
        ("compare.seeds=[]", "compare.seeds"),
        ("domains.datasets={mixture: builtin:legal, shell: builtin:shell}", "rename that domain"),
        ("serve.port=70000", "serve.port=70000"),
    ],
)
def test_each_section_validates_its_ranges_at_load_in_one_line(override, message):
    with pytest.raises(LoralabError, match=message) as error:
        load_config(overrides=[override])
    assert "\n" not in str(error.value)


def test_validate_also_checks_configs_built_in_code():
    cfg = Config()
    cfg.model.precision = "fp33"
    with pytest.raises(LoralabError, match="model.precision='fp33'"):
        cfg.validate()


def test_cli_config_rejects_a_bad_choice_in_one_line(capsys):
    assert main(["config", "--set", "model.precision=fp33"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.precision='fp33'" in err and "auto, bf16, fp32" in err


def test_method_choices_are_the_registry_names():
    from loralab.adapters.registry import METHOD_NAMES

    assert choices(MethodName) == METHOD_NAMES


def test_run_identity_is_what_a_run_learns_from():
    base = run_digest(Config())
    for section, key, value in [("train", "learning_rate", 2e-3), ("train", "eval_examples", 10), ("lora", "r", 4),
                                ("model", "quantize_base", "nf4"), ("data", "seed", 1), ("data", "out_dir", "other")]:
        cfg = Config()
        setattr(getattr(cfg, section), key, value)
        assert run_digest(cfg) != base, f"{section}.{key}"
    for section, key, value in [("train", "run_dir", "x"), ("train", "output_dir", "y"), ("train", "results_dir", "z"),
                                ("train", "eval_every", 7), ("train", "save_every", 3), ("train", "compile", True),
                                ("model", "device", "cpu"), ("model", "cache_dir", "c"), ("eval", "batch_size", 2),
                                ("tune", "n_trials", 3)]:
        cfg = Config()
        setattr(getattr(cfg, section), key, value)
        assert run_digest(cfg) == base, f"{section}.{key}"
    yaml_int = Config()
    yaml_int.train.epochs = 1  # an int where the default is 1.0: the same run
    assert run_identity(yaml_int) == run_identity(Config()) and run_digest(yaml_int) == base
