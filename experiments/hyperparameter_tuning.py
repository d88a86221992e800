"""`python experiments/hyperparameter_tuning.py [--quick] [--config FILE] [--set tune.n_trials=K ...]`: same as `loralab tune`.

An Optuna search over `tune.space` (TPE by default; the spec's grid over learning rate, batch size and
LoRA rank with `--config configs/grid.yaml`); writes experiments/metrics_comparison.json and
experiments/best_config.yaml.
"""

import sys

from loralab.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
