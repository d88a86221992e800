"""Inference throughput: naive PEFT `generate` at batch 1 versus `loralab serve`, in one run.

    python benchmarks/inference.py [--adapter lora] [--max-tokens 64] [--skip-load]

(a) naive: the unmerged PEFT model (base + the adapter), `model.generate` one request at a time,
    greedy, fp32: what the PEFT docs show;
(b) loralab serve with base + adapter (multi-LoRA: requests name the adapter per request) and
    (c) loralab serve with the merged model, each at 1, 4, 8 and 16 concurrent clients using
    the official `openai` client. The server runs in its own process on a free loopback port.
Every request asks for exactly --max-tokens tokens (`ignore_eos`), so all paths produce the same
number of tokens. Printed: total tokens/s, p50/p95 request latency, and the ratio to (a).
Then a load run: 500 requests from 32 concurrent clients against the multi-LoRA server (queue
bound 64): counts by status (zero 5xx expected), and the server's RSS before and after.
Results go to benchmarks/results/inference.json. Timings on a shared 2-core CPU are noisy:
compare the ratios printed by one run, with nothing else running.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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


def naive(adapter: str, max_tokens: int, requests: int) -> dict:
    import torch
    from peft import PeftModel

    from loralab.config import Config
    from loralab.data.chat import ensure_chat_template, prompt_ids
    from loralab.model_utils import load_base_model

    loaded = load_base_model(Config().model, torch.device("cpu"))
    ensure_chat_template(loaded.tokenizer)
    model = PeftModel.from_pretrained(loaded.model, adapter).eval()
    latencies, tokens = [], 0
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(requests):
            ids = torch.tensor([prompt_ids(loaded.tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])])
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            latencies.append(time.perf_counter() - t0)
            tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, **_percentiles(latencies)}


def llama_cpp(gguf_path: Path, max_tokens: int, requests: int) -> dict | None:
    """The exported GGUF in llama.cpp, batch 1, when the optional llama-cpp-python is installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    latencies, tokens = [], 0
    started = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        out = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                         max_tokens=max_tokens, temperature=0.0)
        latencies.append(time.perf_counter() - t0)
        tokens += out["usage"]["completion_tokens"]
    wall = time.perf_counter() - started
    return {"gguf": str(gguf_path), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50_s": round(pick(0.5), 3), "p95_s": round(pick(0.95), 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    def __init__(self, *args: str):
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**os.environ, "LORALAB_API_KEY": ""}
        self.process = subprocess.Popen([sys.executable, "-m", "loralab", "serve", "--port", str(self.port),
                                         "--set", "serve.max_queue=64", "--set", "serve.max_batch=16", *args],
                                        cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None:
                    raise SystemExit(f"server exited: {Path(self.log.name).read_text()[-2000:]}") from None
                time.sleep(0.3)
        raise SystemExit("server did not start in 180 s")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def concurrent_run(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, max_tokens=max_tokens, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        return time.perf_counter() - t0, r.usage.completion_tokens

    client.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])  # warm-up
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": tokens / wall, **_percentiles([t for t, _ in results])}


def load_run(server: Server, model: str, requests: int, clients: int, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": PROMPTS[0]}]}).encode()

    def one(_: int) -> int:
        request = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return -1  # no answer at all: counted, never hidden

    rss_before = _rss_mb(server.process.pid)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    return {"requests": requests, "clients": clients, "max_tokens": max_tokens, "wall_s": round(wall, 1), "status_counts": counts,
            "server_rss_mb_before": round(rss_before, 1), "server_rss_mb_after": round(_rss_mb(server.process.pid), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default="lora")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)  # the config's relative paths (models/base_model, lora) are the repository's
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict = {"max_tokens": args.max_tokens, "cpu_count": os.cpu_count()}

    print("naive: unmerged PEFT, generate at batch 1 ...", flush=True)
    results["naive"] = naive(str(REPO / args.adapter), args.max_tokens, requests=8)
    base = results["naive"]["tokens_per_s"]
    print(f"  {base:.1f} tokens/s, p50 {results['naive']['p50_s']} s", flush=True)

    from loralab.config import Config
    from loralab.model_utils import merge_to_directory

    merged_dir = Path(tempfile.mkdtemp(prefix="loralab-merged-"))
    merge_to_directory(Config().model, REPO / args.adapter, merged_dir / "merged")
    modes = {"multi-lora": (["--adapter", f"medical={REPO / args.adapter}"], "medical"),
             "merged": (["--merged", str(merged_dir / "merged")], "merged")}
    for mode, (server_args, model_id) in modes.items():
        server = Server(*server_args)
        try:
            results[mode] = []
            for clients in levels:
                run = concurrent_run(server.url, model_id, clients, max(8, 2 * clients), args.max_tokens)
                run["speedup_vs_naive"] = run["tokens_per_s"] / base
                results[mode].append(run)
                print(f"{mode} x{clients}: {run['tokens_per_s']:.1f} tokens/s ({run['speedup_vs_naive']:.2f}x naive), "
                      f"p50 {run['p50_s']} s, p95 {run['p95_s']} s", flush=True)
            if mode == "multi-lora" and not args.skip_load:
                results["load"] = load_run(server, model_id, requests=500, clients=32, max_tokens=16)
                print(f"load: {results['load']}", flush=True)
        finally:
            server.close()
    gguf_files = sorted((REPO / "models" / "fine_tuned_model").glob("*.Q8_0.gguf"))
    if gguf_files:
        results["llama_cpp"] = llama_cpp(gguf_files[0], args.max_tokens, requests=8)
        print(
            "llama.cpp: "
            + (
                f"{results['llama_cpp']['tokens_per_s']:.1f} tokens/s (stops at end of turn; no ignore_eos)"
                if results["llama_cpp"]
                else "skipped (pip install llama-cpp-python: compiles ~13 min)"
            ),
            flush=True,
        )
    out = REPO / "benchmarks" / "results" / "inference.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
