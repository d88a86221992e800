import pytest

from loralab.cli import REPO_CONFIGS, main
from loralab.config import Config, load_config
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
    cfg = load_config(REPO_CONFIGS / "quick.yaml")
    assert cfg.train.max_steps > 0
    for path in (cfg.data.out_dir, cfg.train.output_dir, cfg.train.log_file, cfg.eval.report_md, cfg.eval.results_json,
                 cfg.compare.runs_dir, cfg.compare.records_dir, cfg.compare.results_json, cfg.compare.summary_md, cfg.compare.plots_dir,
                 cfg.domains.runs_dir, cfg.domains.results_json, cfg.domains.summary_md, cfg.domains.plots_dir):
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
