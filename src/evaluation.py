"""The spec's evaluation step, a thin public entry point: `python src/evaluation.py [--quick] [--config FILE] [--set k=v ...]`
is `loralab evaluate`. The code lives in `loralab.metrics`; this module re-exports its public functions."""

import sys

if __package__ in (None, ""):  # run as a script: src/ itself must not shadow top-level packages
    del sys.path[0]

from loralab.metrics.evaluate import evaluate_adapter, evaluate_model_pair, measure_quality  # noqa: E402,F401

if __name__ == "__main__":
    from loralab.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
