"""The spec's fine-tuning step, a thin public entry point:
`python src/fine_tune_lora.py [--quick] [--config FILE] [--set k=v ...]`
is `loralab train`. The code lives in `loralab.training` (the recipe: `setup` -> `loop` -> `finish`, in
training/recipe.py); this module re-exports its public functions."""

import sys

if __package__ in (None, ""):  # run as a script: src/ itself must not shadow top-level packages
    del sys.path[0]

from loralab.training.recipe import TrainResult, TrainState, setup, train  # noqa: E402,F401

if __name__ == "__main__":
    from loralab.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
