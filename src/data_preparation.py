"""The spec's data-preparation step, a thin public entry point:
`python src/data_preparation.py [--quick] [--config FILE] [--set k=v ...]`
is `loralab prepare`. The code lives in `loralab.data`; this module re-exports its public functions."""

import sys

if __package__ in (None, ""):  # run as a script: src/ itself must not shadow top-level packages
    del sys.path[0]

from loralab.data.prepare import load_split, prepare_dataset  # noqa: E402,F401

if __name__ == "__main__":
    from loralab.cli import main

    sys.exit(main(["prepare", *sys.argv[1:]]))
