"""From rows to optimizer steps: encoding, and the batch plan that makes resume exact.

The plan is a pure function of the example lengths and the seed, so a resumed run replays the very
micro-batches an uninterrupted one would have drawn, without saving any data-loader state.
"""

from __future__ import annotations

import math
import random
import sys

from loralab.data.chat import EncodedExample, encode_chat
from loralab.util.errors import LoralabError

BUCKET_FACTOR = 32  # micro-batches per length-sorted pool: low padding, still well shuffled

BatchPlan = list[list[list[int]]]  # optimizer steps -> micro-batches -> example indices


def encode_rows(tokenizer, rows: list[dict], max_length: int, warn: bool = True) -> list[EncodedExample]:
    encoded = [encode_chat(tokenizer, row["messages"], max_length) for row in rows]
    dropped = sum(e is None for e in encoded)
    if dropped and warn:
        print(f"warning: {dropped} of {len(rows)} examples do not fit in train.max_length={max_length} with their "
              f"whole final answer and were left out (raise train.max_length to keep them)", file=sys.stderr)
    return [e for e in encoded if e is not None]


def plan_batches(
    lengths: list[int], batch_size: int, accumulation: int, total_steps: int, seed: int,
    bucket_factor: int = BUCKET_FACTOR,
) -> BatchPlan:
    """Optimizer steps -> micro-batches -> example indices; a pure function of its arguments.

    Each epoch is a seeded permutation cut into pools of `bucket_factor` micro-batches; a pool is
    sorted by length and cut into micro-batches whose order is then shuffled, so examples of
    similar length share a batch (little padding) without a length-ordered curriculum.
    bucket_factor=1 gives plain random batches.
    """
    steps: BatchPlan = []
    epoch = 0
    while len(steps) < total_steps:
        rng = random.Random(seed * 100_003 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        micro: list[list[int]] = []
        pool = batch_size * bucket_factor
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
            micro += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(micro)
        if len(micro) < accumulation:
            raise LoralabError(
                f"{len(lengths)} training examples make {len(micro)} micro-batches of {batch_size}, fewer than "
                f"train.gradient_accumulation={accumulation}: lower one of them"
            )
        for start in range(0, len(micro) - accumulation + 1, accumulation):
            steps.append(micro[start : start + accumulation])
        epoch += 1
    return steps[:total_steps]


def padding_fraction(plan: BatchPlan, lengths: list[int]) -> float:
    """Share of the plan's padded token slots that are padding (each micro-batch padded to its longest
    example): the most that packing examples into rows could save. Under data parallelism each rank pads
    its own share, so this is an upper bound there."""
    micro_batches = [mb for step in plan for mb in step]
    slots = sum(max(lengths[i] for i in mb) * len(mb) for mb in micro_batches)
    real = sum(lengths[i] for mb in micro_batches for i in mb)
    return 1 - real / slots if slots else 0.0


def steps_per_epoch(n_examples: int, batch_size: int, accumulation: int) -> int:
    return max(1, math.ceil(n_examples / batch_size) // accumulation)
