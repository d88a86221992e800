"""Does `torch.compile` of the decoder layers pay for loralab's default training step on this CPU?

    python benchmarks/compile_probe.py            # about 7 minutes on a 2-core CPU

Issue 14 asks for the decoder blocks compiled, with their compiled artifacts cached across runs so that
short runs pay off. This measures whether there is anything to cache for: the default training step
(`loralab.training.recipe.train_step`, default config, batch 8, seed 42) on the first 320 training
examples, 40 optimizer steps, each setup in its own process:
  eager                      the default, as `loralab train` runs it;
  compiled, cold cache       each decoder layer `compile(dynamic=True)` (one graph meant for every
                             sequence length and batch size), with an empty Inductor cache;
  compiled, warm cache       the same again, reusing the cache the previous process filled (what a
                             cache across runs would buy);
  eager, one shape /         the same batch every step, and the layers compiled with static shapes:
  compiled, one shape        the compiler's best case, which real length-varying batches never reach.
Printed per setup: the first 10 steps' seconds (compilation lands there), tokens/s over steps 11-40,
the ratio of that to eager, and the loss at step 40 (the compiled step must train the same model).
Results go to benchmarks/results/compile_probe_<cpu class>.json and .md, with the CPU and provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
STEPS, WARMUP, BATCH = 40, 10, 8
# name -> (compile mode, one fixed batch shape, Inductor cache: its own empty one, or the one shared by the two
# compiled setups in this order, so that the second finds what the first compiled)
SETUPS = {
    "eager": ("eager", False, "own"),
    "compiled, cold cache": ("dynamic", False, "shared"),
    "compiled, warm cache": ("dynamic", False, "shared"),
    "eager, one shape": ("eager", True, "own"),
    "compiled, one shape": ("static", True, "own"),
}


def measure(mode: str, fixed: bool) -> dict:
    """One setup in this process: per-step seconds, tokens and losses of the default training step."""
    import torch

    from loralab.config import load_config
    from loralab.data.prepare import load_split
    from loralab.training import recipe

    cfg = load_config(overrides=["train.seed=42"])
    scratch = Path(tempfile.mkdtemp(prefix="compile_probe_"))
    (scratch / "data").mkdir()
    data_dir = REPO / cfg.data.out_dir
    (scratch / "data" / "train_split.json").write_text(json.dumps(load_split(data_dir, "train")[: STEPS * BATCH]))
    (scratch / "data" / "eval_split.json").write_text(json.dumps(load_split(data_dir, "eval")[:8]))
    cfg.data.out_dir = str(scratch / "data")
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.eval_every, cfg.train.save_every = BATCH, STEPS, 0, 0
    cfg.train.run_dir, cfg.train.output_dir, cfg.train.results_dir = (str(scratch / d) for d in ("run", "lora", "res"))
    state = recipe.setup(cfg, quiet=True)
    if fixed:
        state.plan = [state.plan[1]] * STEPS  # one batch, hence one shape, every step
    if mode != "eager":
        for layer in state.model.get_base_model().model.layers:
            layer.compile(dynamic=mode == "dynamic")
    seconds, tokens, losses = [], [], []
    for step in range(1, STEPS + 1):
        started = time.perf_counter()
        loss, n_tokens = recipe.train_step(state, step)
        seconds.append(time.perf_counter() - started)
        tokens.append(n_tokens)
        losses.append(loss)
    return {"seconds": seconds, "tokens": tokens, "losses": losses, "torch": torch.__version__}


def summarise(run: dict) -> dict:
    steady_s, steady_tokens = sum(run["seconds"][WARMUP:]), sum(run["tokens"][WARMUP:])
    return {"first_steps_s": round(sum(run["seconds"][:WARMUP]), 1), "steady_tokens_per_s": round(steady_tokens / steady_s, 1),
            "total_s": round(sum(run["seconds"]), 1), "final_loss": round(run["losses"][-1], 4)}


def table(results: dict) -> list[str]:
    eager = {False: results["eager"]["steady_tokens_per_s"], True: results["eager, one shape"]["steady_tokens_per_s"]}
    lines = [f"| setup | first {WARMUP} steps s | tokens/s, steps {WARMUP + 1}-{STEPS} | x eager | loss at step {STEPS} |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        ratio = r["steady_tokens_per_s"] / eager[SETUPS[name][1]]
        lines.append(f"| {name} | {r['first_steps_s']} | {r['steady_tokens_per_s']} | {ratio:.2f} | {r['final_loss']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", help=argparse.SUPPRESS)  # child process: one setup
    args = parser.parse_args()
    if args.setup:
        mode, fixed, _ = SETUPS[args.setup]
        print("RESULT " + json.dumps(measure(mode, fixed)), flush=True)
        return
    from loralab.util import atomic_io, provenance
    from loralab.util.cpu import cpu_profile

    shared_cache = tempfile.mkdtemp(prefix="compile_probe_inductor_")
    results = {}
    for name, (_, _, cache) in SETUPS.items():
        print(f"measuring {name} ...", flush=True)
        cache_dir = shared_cache if cache == "shared" else tempfile.mkdtemp(prefix="compile_probe_inductor_")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        out = subprocess.run([sys.executable, __file__, "--setup", name], capture_output=True, text=True, env=env)
        line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = summarise(json.loads(line[len("RESULT "):]))
    cpu = cpu_profile()
    command = "python benchmarks/compile_probe.py"
    header = (f"Written by `{command}`; default training step, batch {BATCH}, {STEPS} steps, seed 42; "
              f"CPU {cpu['cpu']} ({cpu['class']}, {cpu['cores']} cores).")
    lines = table(results)
    print("\n" + header + "\n\n" + "\n".join(lines))
    stem = RESULTS_DIR / f"compile_probe_{cpu['class']}"
    atomic_io.write_json(stem.with_suffix(".json"), {"command": command, "cpu": cpu, "results": results, "table": lines,
                                                     "provenance": provenance.record(None, command)})
    atomic_io.write_text(stem.with_suffix(".md"), header + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {stem.relative_to(REPO)}.json and .md")


if __name__ == "__main__":
    main()
