"""Which engine `loralab serve` runs: `auto` falls back to torch with one line saying why, an
explicit `--engine llama.cpp` that cannot run is refused in one line, and `--engine vllm` hands
the same adapters, by name, to `vllm serve`."""

import json

import pytest

from loralab.config import Config
from loralab.deploy.serve.engine import Engine
from loralab.deploy.serve.loading import load_served
from loralab.deploy.serve.vllm import launch_vllm, vllm_command
from loralab.util.errors import LoralabError


def _cfg(model_dir, tmp_path, engine: str) -> Config:
    cfg = Config()
    cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.precision = str(model_dir), str(tmp_path / "models"), "fp32"
    cfg.serve.engine, cfg.serve.adapters = engine, {}
    return cfg


def test_auto_serves_with_torch_and_says_why_when_llama_cpp_is_not_built(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_LLAMA_CPP_BIN", str(tmp_path))  # an empty folder: no llama-server
    said = []
    served = load_served(_cfg(tiny_llama_dir, tmp_path, "auto"), say=said.append)
    assert isinstance(served.engine, Engine)
    assert said == ["engine: torch, because llama.cpp cannot serve this here: llama-server is not built on this machine: "
                    "run `make llama-cpp` (about 7 minutes on 2 cores, once)"]
    with pytest.raises(LoralabError, match=r"^serve.engine=llama.cpp: llama-server is not built"):
        load_served(_cfg(tiny_llama_dir, tmp_path, "llama.cpp"), say=said.append)


def test_auto_falls_back_for_an_architecture_gguf_cannot_express(tiny_gpt2_dir, tmp_path, llama_server_built):
    said = []
    served = load_served(_cfg(tiny_gpt2_dir, tmp_path, "auto"), say=said.append)
    assert isinstance(served.engine, Engine)
    assert len(said) == 1 and said[0].startswith("engine: torch, because") and "'gpt2'" in said[0]


def test_vllm_gets_every_adapter_by_name_and_the_largest_rank(tmp_path, monkeypatch):
    monkeypatch.delenv("LORALAB_VLLM", raising=False)
    for name, rank in (("alpha", 8), ("beta", 32)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank, "rank_pattern": {}}))
    cfg = Config()
    cfg.model.name_or_path = "models/my-base"
    cfg.serve.adapters = {"alpha": str(tmp_path / "alpha"), "beta": str(tmp_path / "beta")}
    command = vllm_command(cfg, tmp_path / "hf")
    assert command[:5] == ["vllm", "serve", str(tmp_path / "hf"), "--served-model-name", "my-base"]
    assert command[command.index("--max-lora-rank") + 1] == "32"
    assert command[command.index("--lora-modules") + 1:] == [f"alpha={tmp_path / 'alpha'}", f"beta={tmp_path / 'beta'}"]
    monkeypatch.setenv("LORALAB_VLLM", "/venv/bin/python -m vllm.entrypoints.openai.api_server")
    assert vllm_command(cfg, tmp_path / "hf")[:6] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                                                      str(tmp_path / "hf"), "--served-model-name"]
    cfg.serve.merged_model = str(tmp_path / "hf")
    with pytest.raises(LoralabError, match=r"^serve.engine=vllm: `/venv/bin/python` is not installed"):
        launch_vllm(cfg)
