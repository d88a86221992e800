"""`python experiments/hyperparameter_tuning.py [--quick] [--set tune.grid=...]`: same as `loralab tune`.

Grid search over learning rate, batch size and LoRA rank; writes experiments/metrics_comparison.json
and experiments/best_config.yaml.
"""

import sys

from loralab.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
