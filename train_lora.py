"""`python train_lora.py [--resume] [--config FILE] [--set k=v ...]`: same as `loralab train`."""

import sys

from loralab.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
