"""Serving against llama.cpp's llama-server, the engine people run small GGUF models with on CPU.

    make llama-cpp && python benchmarks/inference.py [--clients 1,8,32] [--max-tokens 64]

Same model and adapters on both engines, each server in its own process on a loopback port,
streamed OpenAI chat completions, greedy, every request asking for exactly --max-tokens tokens
(`ignore_eos`, which both honour), a warm-up request first:
- llama-server (-t = all cores, -np = clients): the merged model as F16 and as Q8_0 GGUF; the F16
  base GGUF with the adapter as a GGUF adapter (`--lora`); and with four adapters, each request
  naming one of them (llama-server does not batch requests with different adapters together);
- `loralab serve --engine torch` (continuous batching; fp32 on a CPU without native bf16): merged,
  base + the adapter, base + the four adapters mixed (in one batch);
- `loralab serve --engine llama.cpp` (llama-server behind loralab's gateway, F16 GGUF written by
  loralab): the same three setups, to measure what the gateway costs;
- naive: PEFT `generate` at batch 1, unmerged, warmed up, in the torch engine's dtype.
The four adapters are the committed lora/ and experiments/best/lora/, and a copy of each under
another name (their weights do not change the speed; their names keep them apart).
Printed per engine and client count: aggregate output tokens/s, time to first token p50/p99,
inter-token latency p50/p99 (gaps between streamed tokens), and how many requests were answered;
then the ratios to llama-server on the same setup. Written to benchmarks/results/inference_<class>.json
with the CPU, and the tables to inference_<class>.md beside it. Timings on a 2-core CPU are noisy: compare
ratios from one run, nothing else running.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the ICD-10-CM code for essential (primary) hypertension?",
    "Define the phenotype 'Microcephaly'.",
    "What does the medical abbreviation 'BID' stand for?",
    "Which ICD-10-CM chapter covers diseases of the circulatory system?",
    "List phenotypes associated with Marfan syndrome.",
    "What does ICD-10-CM code E11.9 describe?",
    "Define the phenotype 'Hepatomegaly'.",
    "What does the medical abbreviation 'NPO' stand for?",
]
ADAPTERS = {"medical": "lora", "best": "experiments/best/lora", "medical2": "lora", "best2": "experiments/best/lora"}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def stream_one(url: str, body: dict) -> dict:
    """One streamed chat completion: when each token arrived, and whether it finished."""
    parts = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=900)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json", "Authorization": "Bearer none"})
    response = connection.getresponse()
    arrivals, finished = [], False
    if response.status == 200:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    arrivals.append(time.perf_counter() - started)
                finished = finished or choice.get("finish_reason") is not None
    connection.close()
    return {"status": response.status, "finished": finished, "arrivals": arrivals}


def load_level(url: str, clients: int, requests: int, max_tokens: int, body_of) -> dict:
    """`requests` streamed requests from `clients` concurrent clients."""
    def one(i: int) -> dict:
        body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], **body_of(i)}
        return stream_one(url, body)

    stream_one(url, {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **body_of(0)})  # warm-up
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    answered = [a for a in answers if a["finished"] and a["arrivals"]]
    gaps = [b - a for r in answered for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    ttft = [r["arrivals"][0] for r in answered]
    return {"clients": clients, "requests": requests, "answered": len(answered), "tokens": max_tokens * len(answered),
            "streamed_chunks": sum(len(r["arrivals"]) for r in answered), "wall_s": round(wall, 2),
            "tokens_per_s": round(max_tokens * len(answered) / wall, 1),
            "ttft_p50_s": round(_percentile(ttft, 0.5), 3), "ttft_p99_s": round(_percentile(ttft, 0.99), 3),
            "itl_p50_ms": round(1000 * _percentile(gaps, 0.5), 1), "itl_p99_ms": round(1000 * _percentile(gaps, 0.99), 1)}


@contextmanager
def loralab_server(args: list[str], max_batch: int):
    from loralab.deploy.llama_cpp import wait_healthy
    from loralab.util.net import free_port

    port = free_port()
    log = tempfile.NamedTemporaryFile(suffix=".log", delete=False)  # kept: the server's log, for a look afterwards
    env = {**os.environ, "LORALAB_API_KEY": ""}
    process = subprocess.Popen([sys.executable, "-m", "loralab", "serve", "--port", str(port), "--set", "serve.max_queue=256",
                                "--set", f"serve.max_batch={max_batch}", *args], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log, 300, name="loralab serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def loralab_setups(engine: str, merged: Path, names: list[str]) -> dict:
    """`loralab serve --engine ENGINE`: merged, base + one adapter, base + four adapters mixed."""
    run = lambda args: lambda n: loralab_server(["--engine", engine, *args], n)  # noqa: E731
    four = [x for a in names for x in ("--adapter", f"{a}={REPO / ADAPTERS[a]}")]
    return {f"loralab {engine} merged": (run(["--merged", str(merged)]), lambda i: {"model": "merged"}),
            f"loralab {engine} base + 1 adapter": (run(["--adapter", f"medical={REPO / ADAPTERS['medical']}"]),
                                                   lambda i: {"model": "medical"}),
            f"loralab {engine} base + 4 adapters mixed": (run(four), lambda i: {"model": names[i % 4]})}


def naive(adapter: Path, max_tokens: int, requests: int) -> dict:
    """PEFT generate at batch 1, unmerged, warmed up, in the dtype `loralab serve` decodes in here."""
    import torch
    from peft import PeftModel

    from loralab.config import Config
    from loralab.data.chat import ensure_chat_template, prompt_ids
    from loralab.model_utils import load_base_model, resolve_autocast_dtype

    cfg = Config()
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    ensure_chat_template(loaded.tokenizer)
    model = PeftModel.from_pretrained(loaded.model, adapter).eval()
    dtype = resolve_autocast_dtype(cfg.model.precision, torch.device("cpu"))
    ids = [torch.tensor([prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}])]) for p in PROMPTS]
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.no_grad()
    with torch.no_grad(), autocast:
        model.generate(ids[0], max_new_tokens=8, do_sample=False)  # warm-up
        started = time.perf_counter()
        for i in range(requests):
            model.generate(ids[i % len(ids)], max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    wall = time.perf_counter() - started
    return {"dtype": str(dtype or torch.float32), "requests": requests, "tokens_per_s": round(requests * max_tokens / wall, 1)}


def write_models(work: Path) -> dict[str, Path]:
    """The GGUF files llama-server reads and the merged directory `loralab serve` reads, from the committed adapters."""
    import torch

    from loralab.config import Config
    from loralab.data.chat import ensure_chat_template
    from loralab.deploy.export import source_pre_tokenizer
    from loralab.deploy.gguf import write_gguf
    from loralab.deploy.gguf_lora import write_gguf_lora
    from loralab.model_utils import load_base_model, merge_to_directory

    cfg = Config()
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    ensure_chat_template(loaded.tokenizer)
    pre = source_pre_tokenizer(loaded.local_dir)
    paths = {"base_f16": write_gguf(loaded.model, loaded.tokenizer, work / "base.F16.gguf", "f16", "base", pre)}
    for name, adapter in ADAPTERS.items():
        paths[f"lora_{name}"] = write_gguf_lora(REPO / adapter, loaded.model.config, work / f"{name}.lora.gguf")
    paths["merged"] = merge_to_directory(cfg.model, REPO / ADAPTERS["medical"], work / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(paths["merged"], dtype=torch.float32)
    for qtype in ("f16", "q8_0"):
        paths[f"merged_{qtype}"] = write_gguf(merged, loaded.tokenizer, work / f"merged.{qtype}.gguf", qtype, "merged", pre)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)  # the config's relative paths (models/base_model, lora) are the repository's
    from loralab.deploy.llama_cpp import llama_server, require
    from loralab.util.cpu import cpu_profile

    require()
    levels = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="loralab-inference-"))
    results: dict = {"command": "python benchmarks/inference.py " + " ".join(sys.argv[1:]), "cpu": cpu_profile(),
                     "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client, "runs": {}}
    try:
        paths = write_models(work)
        names = list(ADAPTERS)
        one = lambda i: {}  # noqa: E731
        llama_mix = lambda i: {"lora": [{"id": i % 4, "scale": 1.0}]}  # noqa: E731
        setups = {
            "llama-server merged F16": (lambda n: llama_server(paths["merged_f16"], parallel=n), one),
            "llama-server merged Q8_0": (lambda n: llama_server(paths["merged_q8_0"], parallel=n), one),
            "llama-server F16 base + 1 adapter": (
                lambda n: llama_server(paths["base_f16"], [paths["lora_medical"]], parallel=n), one),
            "llama-server F16 base + 4 adapters mixed": (
                lambda n: llama_server(paths["base_f16"], [paths[f"lora_{a}"] for a in names], parallel=n), llama_mix),
        }
        for engine in ("torch", "llama.cpp"):
            setups |= loralab_setups(engine, paths["merged"], names)
        for setup, (start, body_of) in setups.items():
            results["runs"][setup] = []
            for clients in levels:
                with start(clients) as url:
                    run = load_level(url, clients, max(4, args.requests_per_client * clients), args.max_tokens, body_of)
                results["runs"][setup].append(run)
                print(f"{setup:42s} x{clients:<3d} {run['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 {run['ttft_p50_s']}/"
                      f"{run['ttft_p99_s']} s  ITL p50/p99 {run['itl_p50_ms']}/{run['itl_p99_ms']} ms  "
                      f"answered {run['answered']}/{run['requests']}", flush=True)
        results["naive"] = naive(REPO / ADAPTERS["medical"], args.max_tokens, requests=8)
        print(f"naive PEFT generate, batch 1, {results['naive']['dtype']}: {results['naive']['tokens_per_s']} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["ratios"] = ratios(results["runs"], levels)
    for line in results["ratios"]["lines"]:
        print(line)
    from loralab.util import provenance

    results["provenance"] = provenance.record(None, results["command"])
    out = REPO / "benchmarks" / "results" / f"inference_{results['cpu']['class']}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, levels))  # what the docs quote, line for line
    print(f"wrote {out.relative_to(REPO)} and .md")


# The setups compared, each with its llama-server baseline (the run names in results["runs"]).
LLAMA_SERVER_SETUPS = {"merged": "llama-server merged F16", "1 adapter": "llama-server F16 base + 1 adapter",
                       "4 adapters mixed": "llama-server F16 base + 4 adapters mixed"}


def markdown(results: dict, levels: list[int]) -> str:
    """The measured tables as Markdown: per engine and client count, then the ratios to llama-server."""
    cpu = results["cpu"]
    lines = [f"Written by `{results['command'].strip()}`; CPU {cpu['cpu']} ({cpu['class']}, {cpu['cores']} cores).", "",
             "| engine, setup | clients | output tokens/s | TTFT p50 / p99 s | inter-token p50 / p99 ms | answered |",
             "|---|---:|---:|---:|---:|---:|"]
    for setup, runs in results["runs"].items():
        for i, run in enumerate(runs):
            lines.append(f"| {setup if i == 0 else ''} | {run['clients']} | {run['tokens_per_s']} | {run['ttft_p50_s']} / "
                         f"{run['ttft_p99_s']} | {run['itl_p50_ms']} / {run['itl_p99_ms']} | "
                         f"{run['answered']}/{run['requests']} |")
    naive_run = results["naive"]
    lines += ["", f"Naive PEFT `generate`, batch 1, {naive_run['dtype'].removeprefix('torch.')}: "
                  f"{naive_run['tokens_per_s']} tokens/s.", "",
              "| engine | setup | " + " | ".join(f"{c} clients" for c in levels) + f" | TTFT p99 at {levels[-1]} |",
              "|---|---|" + "---:|" * (len(levels) + 1)]
    table = results["ratios"]["table"]
    for engine in ("llama.cpp", "torch"):
        for label in LLAMA_SERVER_SETUPS:
            cells = [f"{table[f'{engine} {label} x{c}']['tokens_per_s']:.2f}x" for c in levels]
            lines.append(f"| `--engine {engine}` | {label} | " + " | ".join(cells)
                         + f" | {table[f'{engine} {label} x{levels[-1]}']['ttft_p99']}x |")
    return "\n".join(lines) + "\n"


def ratios(runs: dict, levels: list[int]) -> dict:
    """Each loralab engine against llama-server alone on the same setup, per client count."""
    table, lines = {}, []
    for engine in ("torch", "llama.cpp"):
        lines.append(f"loralab --engine {engine} / llama-server, aggregate tokens/s and TTFT p99:")
        for label, baseline in LLAMA_SERVER_SETUPS.items():
            ours = f"loralab {engine} {'merged' if label == 'merged' else 'base + ' + label}"
            for i, clients in enumerate(levels):
                a, b = runs[ours][i], runs[baseline][i]
                entry = {"tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 2),
                         "ttft_p99": round(a["ttft_p99_s"] / b["ttft_p99_s"], 2) if b["ttft_p99_s"] else None}
                table[f"{engine} {label} x{clients}"] = entry
                lines.append(f"  {label:18s} x{clients:<3d} tokens/s {entry['tokens_per_s']:.2f}x  TTFT p99 {entry['ttft_p99']}x")
    return {"table": table, "lines": lines}


if __name__ == "__main__":
    main()
