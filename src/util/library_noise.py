"""Silence library messages that are wrong or useless for loralab's users.

Called by the CLI and as the initializer of every spawned worker process (compare, sweep): a spawned
process starts with Python's default warning filters, so the CLI's filters alone do not reach it.
"""

from __future__ import annotations

import os
import warnings


def quiet_library_noise() -> None:
    # loralab never needs a model hub: without this, PEFT tries to fetch the base model's
    # config.json from the hub when saving an adapter and prints a warning when it cannot.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
    warnings.filterwarnings("ignore", message=".*experimental.*")  # Optuna's heartbeat and retry APIs
    # PEFT's generic rank_pattern check does not know AdaLoRA's pattern keys (".lora_E" masks, which
    # PEFT applies separately when it loads the weights), so it warns on every correct AdaLoRA load;
    # tests/test_methods.py checks that the reloaded AdaLoRA adapter gives the trained model's logits.
    warnings.filterwarnings("ignore", message=r"The following rank_pattern keys did not match any targeted module and "
                                              r"were ignored: \['[^']*\.lora_E'", category=RuntimeWarning)
