"""loralab: fine-tune, evaluate and ship small language models with LoRA, offline on a CPU."""

__version__ = "0.1.0"
