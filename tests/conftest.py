"""Shared fixtures: the real SmolLM2 tokenizer, tiny random Llama and GPT-2 models built here, and
small datasets. Logic tests use the tiny models (seconds); tests marked e2e use the real SmolLM2."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: share the cores instead of oversubscribing them
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it starts)

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
warnings.filterwarnings("ignore", message=".*Could not find a config file.*")

from loralab.config import Config, ModelConfig  # noqa: E402
from loralab.deploy import llama_cpp  # noqa: E402
from loralab.model_utils import resolve_model_dir  # noqa: E402

from helpers.data import QA_ROWS, outputs_under, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMOL_CACHE = REPO / "models" / "base_model"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The bundled SmolLM2 as a HF directory (converted once per machine, then cached)."""
    model_dir, _ = resolve_model_dir(ModelConfig(cache_dir=str(SMOL_CACHE)))
    return model_dir


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def _save_tiny(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(smol_tokenizer, tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.3,  # large enough that a few LoRA steps visibly move the output
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    return _save_tiny(LlamaForCausalLM(config), smol_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(smol_tokenizer, tmp_path_factory) -> Path:
    """GPT-2 architecture (Conv1D layers) with a tokenizer that has no chat template."""
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512, initializer_range=0.3,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save_tiny(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def tiny_config(tmp_path, tiny_llama_dir) -> Config:
    """A config whose every output lives under tmp_path, over a prepared 40-row dataset."""
    from loralab.data.prepare import prepare_dataset

    cfg = outputs_under(Config(), tmp_path)
    cfg.data.dataset = str(write_jsonl(tmp_path / "qa.jsonl", QA_ROWS))
    cfg.data.task_field = "task"
    cfg.model.name_or_path = str(tiny_llama_dir)
    cfg.model.cache_dir = str(tmp_path / "models")
    cfg.model.precision = "fp32"
    cfg.lora.dropout = 0.1
    cfg.train.learning_rate = 5e-3
    cfg.train.batch_size = 4
    cfg.train.max_steps = 6
    cfg.train.eval_every = 3
    cfg.train.save_every = 2
    cfg.eval.generation_per_task = 2
    cfg.eval.max_new_tokens = 8
    prepare_dataset(cfg.data)
    return cfg


@pytest.fixture(scope="session")
def llama_server_built():
    """`make test` builds llama-server first (`make llama-cpp`, once per machine)."""
    if llama_cpp.binary() is None:
        message = "llama-server is not built: run `make llama-cpp`"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true fails instead of skipping)", pytrace=False)
        pytest.skip(message)
