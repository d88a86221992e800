"""Pruning (`loralab prune`): unstructured and 2:4 masks, structured removal of heads, MLP channels and
decoder layers, LoRA recovery, and the study that measures which of them pays on a CPU.

Layering: calibration -> unstructured / structured -> prune (the verb) -> study. Nothing here is
imported by training or evaluation; prune imports them.
"""
