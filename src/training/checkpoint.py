"""Checkpoints `--resume` continues from: the adapter, optimizer, scheduler and every rank's RNG
after a finished optimizer step, written atomically, and valid only for the settings they were made with."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from loralab.adapters import methods as peft_methods
from loralab.config import Config, LoraSettings, run_identity
from loralab.training.distributed import DataParallel
from loralab.util import atomic_io


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints under `run_dir`, oldest first (staged, half-written ones do not match)."""
    return sorted((run_dir / "checkpoints").glob("step-*[0-9]"))


def resume_fingerprint(cfg: Config, world_size: int) -> dict:
    """The settings a checkpoint is only valid for (resuming with others would be silently wrong): the
    run's identity, the one definition tune, sweep and compare name runs by, and the world size."""
    # batch_size is per process: another world size is another batch plan
    return {"world_size": world_size, **run_identity(cfg)}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, keep: int, fingerprint: dict,
                    dp: DataParallel, settings: LoraSettings) -> None:
    """Saved between steps: the torch RNG of every rank is then exactly as step `step + 1` will find
    it, so LoRA dropout after a resume draws the masks an uninterrupted run would have drawn.
    Called on every rank (they exchange RNG states); only the main rank writes."""
    rng_per_rank = dp.gather(torch.get_rng_state())
    cuda_rng_per_rank = dp.gather(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    if not dp.is_main:
        return
    with atomic_io.staged_dir(run_dir / "checkpoints" / f"step-{step:07d}") as staged:
        torch.save(
            {
                "step": step,
                "adapter": peft_methods.trainable_state(model, settings),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng_per_rank": rng_per_rank,
                "fingerprint": fingerprint,
                "cuda_rng_per_rank": cuda_rng_per_rank,
            },
            staged / "state.pt",
        )
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_latest_checkpoint(run_dir: Path) -> dict | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint: fall back to the one before
            print(f"warning: skipping unreadable checkpoint {path}", file=sys.stderr)
    return None


def restore_checkpoint(checkpoint: dict, model, optimizer, scheduler, dp: DataParallel, settings: LoraSettings) -> int:
    """Put a loaded checkpoint back into place, this rank's RNG included; returns its step."""
    peft_methods.load_trainable_state(model, settings, checkpoint["adapter"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["torch_rng_per_rank"][dp.rank])
    if checkpoint["cuda_rng_per_rank"][dp.rank] is not None:
        torch.cuda.set_rng_state_all(checkpoint["cuda_rng_per_rank"][dp.rank])
    return checkpoint["step"]
