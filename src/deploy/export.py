"""`loralab export`: the adapter as things people deploy, each verified before it is reported.

- merged: base + adapter as one plain Hugging Face safetensors directory (tokenizer and chat
  template included); verified against base + adapter (PEFT, unmerged).
- gguf-f16 / gguf-q8_0 / gguf-q4_1 / gguf-q4_0: for llama.cpp and Ollama (gguf_export.py); each is loaded
  back through transformers and its logits compared with the merged model's, with a tolerance
  per type (QUALITY_BOUNDS).
- int8: weight-only int8 (per output channel) for every Linear layer but the output head, applied
  at load time (`loralab serve --set serve.int8=true`), verified the same way. int8-dynamic is
  PyTorch's dynamic quantization (activations in int8 too): faster, but SmolLM2's activation
  outliers wreck it (see experiments/export_report.md), so it fails its bound and is not a default.

With `export.evaluate`, every format is also measured on the test split (answer perplexity,
domain accuracy) and for size, load time and tokens/s, into experiments/export_report.md.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import torch

from loralab.config import Config
from loralab.util import atomic_io
from loralab.util.errors import LoralabError

FORMATS = ("merged", "gguf-f16", "gguf-q8_0", "gguf-q4_1", "gguf-q4_0", "int8", "int8-dynamic")
# Upper bounds on the mean KL divergence (nats per token) of a format's next-token distribution
# from the merged fp32 model's, on the verification prompts. Measured values are in the report.
QUALITY_BOUNDS = {"merged": 1e-6, "gguf-f16": 1e-3, "gguf-q8_0": 5e-3, "gguf-q4_1": 0.15, "gguf-q4_0": 0.15, "int8": 0.02,
                  "int8-dynamic": 0.05}
VERIFY_PROMPTS = ["What is the ICD-10-CM code for essential (primary) hypertension?",
                  "Define the phenotype 'Microcephaly'.", "What does the abbreviation BID stand for?"]


class WeightOnlyInt8Linear(torch.nn.Module):
    """int8 weights with one fp32 scale per output row; activations stay in floating point.

    Why not torch's dynamic quantization alone: it also rounds activations to int8 with one scale
    per tensor, and small LLMs have activation outliers that make that scale useless (measured:
    mean KL 1.85 on SmolLM2). Weight-only keeps the quality and a quarter of the Linear memory."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)
        if flat.shape[0] <= 64:  # decoding: torch's int8 weight-only CPU kernel
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:  # a long prompt or a scoring batch: that kernel is slow at many rows, so dequantize once
            out = flat @ (self.weight_int8.to(flat.dtype) * self.scale[:, None]).T
        out = out.reshape(*x.shape[:-1], -1).to(x.dtype)
        return out if self.bias is None else out + self.bias


def quantize_int8(model, dynamic: bool = False):
    """int8 for CPU inference: weight-only (default), or PyTorch dynamic quantization."""
    import warnings

    if dynamic:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks the quantized tensor API deprecated; it still works here
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:  # the head is the tied embedding
                setattr(module, name, WeightOnlyInt8Linear(child))
    return model


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Log-probabilities at every position of the chat-formatted prompts (one long batch row each)."""
    from loralab.data.chat import prompt_ids

    rows = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": prompt}])])
        rows.append(torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1))
    return torch.cat(rows)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    if reference.shape != candidate.shape:  # e.g. a tokenizer that splits the prompts differently
        return {"mean_kl": float("inf"), "max_abs_logprob_diff": float("inf"), "top1_agreement": 0.0,
                "error": f"shape {tuple(candidate.shape)} != reference {tuple(reference.shape)} (tokenizer differs?)"}
    kl = (reference.exp() * (reference - candidate)).sum(-1)
    return {"mean_kl": float(kl.mean()), "max_abs_logprob_diff": float((reference - candidate).abs().max()),
            "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean())}


def _dir_size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 2)


def _state_dict_mb(model) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return round(buffer.tell() / 2**20, 2)


def _source_pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp picks its pre-tokenizer regex by this name; reuse the original GGUF's when there is one."""
    source = model_dir / "loralab_source.json"
    if source.is_file():
        import gguf

        reader = gguf.GGUFReader(json.loads(source.read_text())["gguf"])
        field = reader.fields.get("tokenizer.ggml.pre")
        if field is not None:
            return field.contents()
    return "default"


def _load_format(fmt: str, artifacts: dict[str, Path], merged_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.deploy.gguf import load_gguf

    started = time.perf_counter()
    if fmt.startswith("gguf-"):
        model, tokenizer = load_gguf(artifacts[fmt])
    else:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        if fmt.startswith("int8"):
            model = quantize_int8(model, dynamic=fmt == "int8-dynamic")
    return model, tokenizer, time.perf_counter() - started


@torch.no_grad()
def greedy_tokens_per_s(model, tokenizer, n_tokens: int) -> float:
    from loralab.data.chat import prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": VERIFY_PROMPTS[0]}])])
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
    return n_tokens / (time.perf_counter() - started)


def export(cfg: Config, adapter_dir: str | Path | None = None, formats: list[str] | None = None) -> dict:
    from loralab.data.chat import ensure_chat_template
    from loralab.deploy.gguf import write_gguf
    from loralab.model_utils import load_adapter, load_base_model, merge_to_directory

    formats = list(formats or cfg.export.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise LoralabError(f"export formats {unknown}: expected some of {', '.join(FORMATS)}")
    adapter_dir = Path(adapter_dir or cfg.train.output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoralabError(f"{adapter_dir}: no adapter_config.json (train first, or pass --adapter)")
    out = Path(cfg.export.out_dir)
    merged_dir = out / "merged"

    print(f"merging {adapter_dir} into the base model -> {merged_dir}/", flush=True)
    merge_to_directory(cfg.model, adapter_dir, merged_dir)
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    tokenizer, base_name, base_dir = loaded.tokenizer, loaded.base_name, loaded.local_dir
    ensure_chat_template(tokenizer)
    reference = next_token_logprobs(load_adapter(loaded.model, adapter_dir).eval(), tokenizer, VERIFY_PROMPTS)
    del loaded  # base + LoRA is no longer needed: keep one model in memory at a time
    artifacts: dict[str, Path] = {"merged": merged_dir, "int8": merged_dir, "int8-dynamic": merged_dir}

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    name = f"{Path(cfg.model.name_or_path).name}-{adapter_dir.name}"
    targets = json.loads((adapter_dir / "adapter_config.json").read_text()).get("target_modules") or []
    adapted = {t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}
    for fmt in formats:
        if fmt.startswith("gguf-"):
            qtype = fmt.split("-", 1)[1]
            path = out / f"{name}.{qtype.upper()}.gguf"
            print(f"writing {path}", flush=True)
            artifacts[fmt] = write_gguf(merged, tokenizer, path, qtype, name, _source_pre_tokenizer(base_dir), adapted)
    del merged

    results: dict = {"adapter": str(adapter_dir), "base_model": base_name, "formats": {}}
    rows = None
    if cfg.export.evaluate:
        from loralab.data.prepare import load_split

        rows = load_split(cfg.data.out_dir, cfg.eval.split)
    for fmt in formats:
        model, tokenizer, load_s = _load_format(fmt, artifacts, merged_dir)
        ensure_chat_template(tokenizer)
        check = compare(reference, next_token_logprobs(model, tokenizer, VERIFY_PROMPTS))
        check["bound_mean_kl"] = QUALITY_BOUNDS[fmt]
        check["passed"] = check["mean_kl"] <= QUALITY_BOUNDS[fmt]
        size_mb = _state_dict_mb(model) if fmt.startswith("int8") else _dir_size_mb(artifacts[fmt])
        entry = {"path": str(artifacts[fmt]), "size_mb": size_mb, "load_seconds": round(load_s, 2), "verification": check}
        print(f"{fmt}: mean KL {check['mean_kl']:.2e} vs base+adapter (bound {QUALITY_BOUNDS[fmt]:g}), top-1 agreement "
              f"{100 * check['top1_agreement']:.1f}%", flush=True)
        if rows is not None:
            entry.update(_measure(cfg, model, tokenizer, rows))
        results["formats"][fmt] = entry
        del model
    if rows is not None:
        _write_report(cfg, results)
    failed = [f for f, e in results["formats"].items() if not e["verification"]["passed"]]
    atomic_io.write_json(out / "export_report.json", results)
    if failed:
        raise LoralabError(f"export verification failed for {failed}: see {out}/export_report.json")
    return results


def _measure(cfg: Config, model, tokenizer, rows: list[dict]) -> dict:
    from loralab.metrics.evaluate import measure_quality

    quality = measure_quality(cfg, model, tokenizer, rows, cfg.export.generation_per_task, torch.device("cpu"), None)
    return {"test_perplexity": quality["perplexity"], "domain_accuracy": quality["domain_accuracy"],
            "domain_accuracy_se": quality["domain_accuracy_se"], "generation_examples": quality["generation_examples"],
            "tokens_per_s_batch1": round(greedy_tokens_per_s(model, tokenizer, cfg.export.speed_tokens), 1)}


def _write_report(cfg: Config, results: dict) -> None:
    merged = results["formats"].get("merged", {})
    lines = [
        "# Export formats: size, speed and quality",
        "",
        f"Generated by `loralab export` from `{results['adapter']}` on `{results['base_model']}`. Perplexity is over the whole "
        f"{cfg.eval.split} split; accuracy over {cfg.export.generation_per_task} questions per task "
        "(greedy, mean ± standard error); "
        f"tokens/s is greedy generation at batch 1 ({cfg.export.speed_tokens} tokens) in PyTorch on this CPU, fp32. "
        "GGUF files are loaded back through transformers, which dequantizes them to fp32: their speed here is the fp32 "
        "model's, not llama.cpp's; their perplexity and accuracy are the quantized weights'. KL is the mean KL divergence of "
        "the next-token distribution from base + adapter (unmerged) on fixed prompts.",
        "",
        "| format | size MB | load s | tokens/s | test ppl | Δ ppl vs merged | domain acc. % | Δ acc. | mean KL | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, e in results["formats"].items():
        v = e["verification"]
        d_ppl = e["test_perplexity"] - merged.get("test_perplexity", e["test_perplexity"])
        d_acc = e["domain_accuracy"] - merged.get("domain_accuracy", e["domain_accuracy"])
        lines.append(f"| {fmt} | {e['size_mb']:.1f} | {e['load_seconds']:.2f} | {e['tokens_per_s_batch1']:.1f} | "
                     f"{e['test_perplexity']:.3f} | {d_ppl:+.3f} | {e['domain_accuracy']:.1f} ± {e['domain_accuracy_se']:.1f} | "
                     f"{d_acc:+.1f} | {v['mean_kl']:.1e} | {100 * v['top1_agreement']:.1f}% |")
    lines += ["", "int8 size is its in-memory state dict (int8 is applied at load time); the others are files on disk."]
    atomic_io.write_text(cfg.export.report_md, "\n".join(lines) + "\n")
    atomic_io.write_json(cfg.export.report_json, results)

