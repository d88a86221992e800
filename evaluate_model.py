"""`python evaluate_model.py [--adapter DIR] [--config FILE] [--set k=v ...]`: same as `loralab evaluate`."""

import sys

from loralab.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
