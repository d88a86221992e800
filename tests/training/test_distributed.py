"""Data-parallel `loralab train`: 2 CPU processes (gloo) under `accelerate launch` and `torchrun`,
on a tiny random Llama. The two-process run must follow the one-process loss trajectory at the same
global batch, write the adapter and the log once, and resume exactly after a SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from loralab.training.recipe import train
from loralab.util.net import free_port

STEPS = 200  # long enough that a signal sent after the first checkpoint lands mid-run on any machine


def _launch(launcher: str, config: Path, *extra: str) -> subprocess.Popen:
    port = str(free_port())
    if launcher == "accelerate":
        head = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*head, "-m", "loralab", "train", "--config", str(config), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def _config_file(cfg, root: Path, name: str, save_every: int) -> Path:
    data = cfg.to_dict()
    data["train"].update(batch_size=2, save_every=save_every, run_dir=str(root / f"{name}_run"),
                         output_dir=str(root / f"{name}_lora"), results_dir=str(root / f"{name}_results"),
                         plot_loss=False)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_and_resume_exactly(tiny_config, tmp_path):
    tiny_config.lora.dropout = 0.0  # dropout masks differ per rank by design; the trajectories must not
    tiny_config.train.max_steps = STEPS
    tiny_config.train.eval_every = 50
    tiny_config.train.save_every = 0
    tiny_config.train.batch_size = 4  # the global batch of 2 processes x 2
    one = train(tiny_config, quiet=True)
    single_losses = _losses(Path(tiny_config.train.run_dir))
    single_adapter = load_file(one.adapter_dir / "adapter_model.safetensors")

    # accelerate launch, uninterrupted
    config = _config_file(tiny_config, tmp_path, "accelerate", save_every=0)
    _finish(_launch("accelerate", config))
    two_losses = _losses(tmp_path / "accelerate_run")
    assert len(two_losses) == STEPS
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(single_losses), rtol=2e-4, atol=1e-5)
    reference = load_file(tmp_path / "accelerate_lora" / "adapter_model.safetensors")
    for key in single_adapter:
        torch.testing.assert_close(reference[key], single_adapter[key], rtol=1e-3, atol=1e-5)
    log_lines = (tmp_path / "accelerate_results" / "training_logs.txt").read_text().splitlines()
    assert len(log_lines) == 2 + STEPS  # one header, one row per step: rank 1 wrote nothing
    args = json.loads((tmp_path / "accelerate_lora" / "training_args.json").read_text())
    assert args["data_parallel_processes"] == 2 and args["config"]["train"]["batch_size"] == 2

    # torchrun with LoRA dropout (each rank draws its own masks, so each rank's RNG must be restored):
    # SIGTERM after the first checkpoint, then --resume, gives the uninterrupted run's adapter bit for bit.
    tiny_config.lora.dropout = 0.1
    _finish(_launch("torchrun", _config_file(tiny_config, tmp_path, "reference", save_every=0)))
    reference = load_file(tmp_path / "reference_lora" / "adapter_model.safetensors")
    config = _config_file(tiny_config, tmp_path, "torchrun", save_every=1)
    run_dir = tmp_path / "torchrun_run"
    process = _launch("torchrun", config)
    deadline = time.time() + 180
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step-*[0-9]")) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-3000:]
    assert not (tmp_path / "torchrun_lora").exists()
    assert list((run_dir / "checkpoints").glob("step-*[0-9]"))
    _finish(_launch("torchrun", config, "--resume"))
    resumed = load_file(tmp_path / "torchrun_lora" / "adapter_model.safetensors")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0)
    assert len(_losses(run_dir)) == STEPS
