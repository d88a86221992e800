"""`loralab export`: the adapter as things people deploy, each verified before it is reported.

- merged: base + adapter as one plain Hugging Face safetensors directory (tokenizer and chat
  template included).
- gguf-f16 / gguf-q8_0 / gguf-q4_1 / gguf-q4_0: the merged model for llama.cpp and Ollama (gguf.py).
- gguf-lora: the adapter alone in llama.cpp's GGUF adapter format (gguf_lora.py), for
  `llama-server -m BASE.gguf --lora ADAPTER.gguf`, with an Ollama Modelfile (FROM the base GGUF,
  ADAPTER the adapter).

Verification that can fail: every format's next-token distribution is compared with base + adapter
(PEFT, unmerged) on answer positions (teacher-forced on reference answers, where the adapter acts),
and must be far closer to it than the base model without the adapter is (ADAPTER_EFFECT_FRACTION),
besides an absolute bound per type (QUALITY_BOUNDS). An export that drops the adapter fails.

With `export.evaluate`, every format is also measured on the test split (answer perplexity,
domain score) and for size, load time and tokens/s, into experiments/export_report.md.
(Weight-only int8 is a serving option, `serve.int8`, not an export: nothing else loads it back.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loralab.config import Config
from loralab.util import atomic_io, provenance
from loralab.util.errors import LoralabError

FORMATS = ("merged", "gguf-f16", "gguf-q8_0", "gguf-q4_1", "gguf-q4_0", "gguf-lora")
# Upper bounds on the mean KL divergence (nats per answer token) of a format's next-token
# distribution from base + adapter's. Measured values are in the report.
QUALITY_BOUNDS = {"merged": 1e-6, "gguf-f16": 1e-3, "gguf-q8_0": 5e-3, "gguf-q4_1": 0.15, "gguf-q4_0": 0.15, "gguf-lora": 1e-6}
# ... and as a fraction of the adapter's own effect, KL(base + adapter || base), on the same positions.
ADAPTER_EFFECT_FRACTION = {"merged": 0.01, "gguf-f16": 0.01, "gguf-q8_0": 0.1, "gguf-q4_1": 0.5, "gguf-q4_0": 0.5,
                           "gguf-lora": 0.01}
# Used when no prepared split is at hand: medical questions with their reference answers.
FALLBACK_PAIRS = [("What is the ICD-10-CM code for essential (primary) hypertension?", "I10"),
                  ("Define the phenotype 'Microcephaly'.", "Head circumference below 2 standard deviations below the mean "
                   "for age and gender."),
                  ("What does the abbreviation BID stand for?", "Twice a day (bis in die).")]
VERIFY_ROWS = 8  # eval-split examples the verification is teacher-forced on
SPEED_PROMPT = "What is the ICD-10-CM code for essential (primary) hypertension?"


def verification_pairs(cfg: Config) -> list[tuple[str, str]]:
    """(question, reference answer) pairs: the first eval-split rows when prepared, else FALLBACK_PAIRS."""
    from loralab.data.prepare import load_split

    try:
        rows = [r for r in load_split(cfg.data.out_dir, "eval") if r.get("question") and r.get("answer")]
    except LoralabError:  # not prepared
        return FALLBACK_PAIRS
    return [(r["question"], r["answer"]) for r in rows[:VERIFY_ROWS]] or FALLBACK_PAIRS


@torch.no_grad()
def answer_logprobs(model, tokenizer, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Log-probabilities at each position that predicts a reference-answer token (teacher-forced)."""
    from loralab.data.chat import prompt_ids

    rows = []
    for question, answer in pairs:
        prompt = prompt_ids(tokenizer, [{"role": "user", "content": question}])
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer_ids])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1]
        rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(rows)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    if reference.shape != candidate.shape:  # e.g. a tokenizer that splits the text differently
        return {"mean_kl": float("inf"), "max_abs_logprob_diff": float("inf"), "top1_agreement": 0.0,
                "error": f"shape {tuple(candidate.shape)} != reference {tuple(reference.shape)} (tokenizer differs?)"}
    kl = (reference.exp() * (reference - candidate)).sum(-1)
    mean_kl = max(0.0, float(kl.mean()))  # KL >= 0; float rounding alone can dip a hair below
    return {"mean_kl": mean_kl, "max_abs_logprob_diff": float((reference - candidate).abs().max()),
            "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean())}


def verify(fmt: str, reference: torch.Tensor, candidate: torch.Tensor, adapter_effect: float) -> dict:
    """The format's distance from base + adapter, and whether it is within both of its bounds."""
    check = compare(reference, candidate)
    check["bound_mean_kl"] = QUALITY_BOUNDS[fmt]
    check["bound_fraction_of_adapter_effect"] = ADAPTER_EFFECT_FRACTION[fmt]
    check["passed"] = check["mean_kl"] <= min(QUALITY_BOUNDS[fmt], ADAPTER_EFFECT_FRACTION[fmt] * adapter_effect)
    return check


def _dir_size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 2)


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file a base model was loaded from (recorded by model_utils), or None."""
    source = model_dir / "loralab_source.json"
    return Path(json.loads(source.read_text())["gguf"]) if source.is_file() else None


def source_pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp picks its pre-tokenizer regex by this name; reuse the original GGUF's when there is one."""
    path = source_gguf(model_dir)
    if path is not None:
        import gguf

        field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return field.contents()
    return "default"


def _load_format(cfg: Config, fmt: str, artifacts: dict[str, Path]):
    """(model, tokenizer, load seconds) of one written format, read back from its files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.deploy.gguf import load_gguf
    from loralab.deploy.gguf_lora import read_gguf_lora
    from loralab.model_utils import load_base_model

    started = time.perf_counter()
    if fmt == "gguf-lora":  # the base model plus the deltas the file makes llama.cpp add
        loaded = load_base_model(cfg.model, torch.device("cpu"))
        model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
        state = model.state_dict()
        with torch.no_grad():
            for name, delta in read_gguf_lora(artifacts[fmt], model.config).items():
                state[name].add_(delta)
    elif fmt.startswith("gguf-"):
        model, tokenizer = load_gguf(artifacts[fmt])
    else:
        model = AutoModelForCausalLM.from_pretrained(artifacts[fmt], dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(artifacts[fmt])
    return model, tokenizer, time.perf_counter() - started


@torch.no_grad()
def greedy_tokens_per_s(model, tokenizer, n_tokens: int) -> float:
    from loralab.data.chat import prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": SPEED_PROMPT}])])
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
    return n_tokens / (time.perf_counter() - started)


def write_modelfile(out_dir: Path, base_gguf: Path, adapter_gguf: Path) -> Path:
    """An Ollama Modelfile: the base GGUF with the adapter applied (`ollama create NAME -f Modelfile`)."""
    text = (f"# Written by `loralab export`. Use: ollama create my-model -f {out_dir / 'Modelfile'} && ollama run my-model\n"
            f"FROM {base_gguf.resolve()}\nADAPTER ./{adapter_gguf.name}\n")
    atomic_io.write_text(out_dir / "Modelfile", text)
    return out_dir / "Modelfile"


def _checked_formats(requested: list[str]) -> list[str]:
    unknown = [f for f in requested if f not in FORMATS]
    if unknown:
        raise LoralabError(f"export formats {unknown}: expected some of {', '.join(FORMATS)}")
    return requested


def export(cfg: Config, adapter_dir: str | Path | None = None, formats: list[str] | None = None) -> dict:
    from loralab.data.chat import ensure_chat_template
    from loralab.deploy.gguf import write_gguf
    from loralab.deploy.gguf_lora import read_peft_adapter, write_gguf_lora
    from loralab.model_utils import load_adapter, load_base_model, merge_to_directory

    formats = _checked_formats(list(formats or cfg.export.formats))
    adapter_dir = Path(adapter_dir or cfg.train.output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoralabError(f"{adapter_dir}: no adapter_config.json (train first, or pass --adapter)")
    if "gguf-lora" in formats:
        read_peft_adapter(adapter_dir)  # refuses DoRA, IA3, ... before anything is written
    out = Path(cfg.export.out_dir)
    artifacts: dict[str, Path] = {"merged": out / "merged"}
    print(f"merging {adapter_dir} into the base model -> {artifacts['merged']}/", flush=True)
    merge_to_directory(cfg.model, adapter_dir, artifacts["merged"])

    loaded = load_base_model(cfg.model, torch.device("cpu"))
    tokenizer, base_dir, base_name = loaded.tokenizer, loaded.local_dir, loaded.base_name
    ensure_chat_template(tokenizer)
    pairs = verification_pairs(cfg)
    without_adapter = answer_logprobs(loaded.model, tokenizer, pairs)
    name = f"{Path(cfg.model.name_or_path).name}-{adapter_dir.name}"
    base_gguf = source_gguf(base_dir)
    if "gguf-lora" in formats and base_gguf is None:  # llama.cpp needs the base as GGUF too
        base_gguf = write_gguf(loaded.model, tokenizer, out / f"{Path(cfg.model.name_or_path).name}.F16.gguf", "f16",
                               Path(cfg.model.name_or_path).name, source_pre_tokenizer(base_dir))
    reference = answer_logprobs(load_adapter(loaded.model, adapter_dir).eval(), tokenizer, pairs)
    adapter_effect = compare(reference, without_adapter)["mean_kl"]
    print(f"the adapter's effect on {len(pairs)} reference answers: KL {adapter_effect:.3g} from the base model", flush=True)
    model_config = loaded.model.config
    del loaded  # keep one model in memory at a time

    artifacts.update(_write_merged_ggufs(cfg, formats, adapter_dir, artifacts["merged"], tokenizer, name, base_dir))
    if "gguf-lora" in formats:
        artifacts["gguf-lora"] = write_gguf_lora(adapter_dir, model_config, out / f"{name}.lora.gguf")
        write_modelfile(out, base_gguf, artifacts["gguf-lora"])
        print(f"writing {artifacts['gguf-lora']} and {out / 'Modelfile'} (base {base_gguf})", flush=True)

    results: dict = {"adapter": str(adapter_dir), "base_model": base_name, "verification_answers": len(pairs),
                     "adapter_effect_kl": adapter_effect, "formats": {}}
    rows = None
    if cfg.export.evaluate:
        from loralab.data.prepare import load_split

        rows = load_split(cfg.data.out_dir, cfg.eval.split)
    for fmt in formats:
        results["formats"][fmt] = _check_format(cfg, fmt, artifacts, pairs, reference, adapter_effect, rows)
        if fmt == "gguf-lora":
            results["formats"][fmt].update(base_gguf=str(base_gguf), modelfile=str(out / "Modelfile"))
    results["provenance"] = provenance.record(cfg.to_dict())  # before the report: export.report_json carries it too
    if rows is not None:
        _write_report(cfg, results)
    failed = [f for f, e in results["formats"].items() if not e["verification"]["passed"]]
    atomic_io.write_json(out / "export_report.json", results)
    if failed:
        raise LoralabError(f"export verification failed for {failed}: see {out}/export_report.json")
    return results


def _write_merged_ggufs(cfg: Config, formats: list[str], adapter_dir: Path, merged_dir: Path, tokenizer, name: str,
                        base_dir: Path) -> dict[str, Path]:
    """One GGUF of the merged model per requested type; the adapter's matrices stay Q8_0 in 4-bit files."""
    from transformers import AutoModelForCausalLM

    from loralab.deploy.gguf import write_gguf

    quantized = [f for f in formats if f.startswith("gguf-") and f != "gguf-lora"]
    if not quantized:
        return {}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    targets = json.loads((adapter_dir / "adapter_config.json").read_text()).get("target_modules") or []
    adapted = {t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}
    written = {}
    for fmt in quantized:
        qtype = fmt.split("-", 1)[1]
        path = Path(cfg.export.out_dir) / f"{name}.{qtype.upper()}.gguf"
        print(f"writing {path}", flush=True)
        written[fmt] = write_gguf(merged, tokenizer, path, qtype, name, source_pre_tokenizer(base_dir), adapted)
    return written


def _check_format(cfg: Config, fmt: str, artifacts: dict[str, Path], pairs, reference: torch.Tensor,
                  adapter_effect: float, rows: list[dict] | None) -> dict:
    from loralab.data.chat import ensure_chat_template

    model, tokenizer, load_s = _load_format(cfg, fmt, artifacts)
    ensure_chat_template(tokenizer)
    check = verify(fmt, reference, answer_logprobs(model, tokenizer, pairs), adapter_effect)
    entry = {"path": str(artifacts[fmt]), "size_mb": _dir_size_mb(artifacts[fmt]), "load_seconds": round(load_s, 2),
             "verification": check}
    print(f"{fmt}: mean KL {check['mean_kl']:.2e} from base + adapter (bounds {QUALITY_BOUNDS[fmt]:g} and "
          f"{ADAPTER_EFFECT_FRACTION[fmt]:g} x the adapter's effect), top-1 agreement {100 * check['top1_agreement']:.1f}%"
          f"{'' if check['passed'] else '  FAILED'}", flush=True)
    if rows is not None and fmt != "gguf-lora":  # gguf-lora's weights are the merged model's: measured there
        entry.update(_measure(cfg, model, tokenizer, rows))
    return entry


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
        "model's, not llama.cpp's (for that see `python benchmarks/inference.py`); their perplexity and accuracy are the "
        "quantized weights'. KL is the mean KL divergence of the next-token distribution from base + adapter (unmerged), "
        f"teacher-forced on the reference answers of {results['verification_answers']} eval-split questions; the adapter "
        f"itself moves the base model by KL {results['adapter_effect_kl']:.3g} there, and every format must stay far below "
        "that (the last column: its fraction of it). gguf-lora is the adapter alone for llama.cpp's `--lora` and Ollama's "
        "ADAPTER; its weights are the merged model's, so it is measured for size and KL only.",
        "",
        "| format | size MB | load s | tokens/s | test ppl | Δ ppl vs merged | domain acc. % | Δ acc. | mean KL | top-1 agree "
        "| KL / adapter effect |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, e in results["formats"].items():
        v = e["verification"]
        share = v["mean_kl"] / results["adapter_effect_kl"] if results["adapter_effect_kl"] else float("inf")
        tail = f"{v['mean_kl']:.1e} | {100 * v['top1_agreement']:.1f}% | {share:.1e} |"
        if "test_perplexity" not in e:
            lines.append(f"| {fmt} | {e['size_mb']:.1f} | {e['load_seconds']:.2f} | — | — | — | — | — | {tail}")
            continue
        d_ppl = e["test_perplexity"] - merged.get("test_perplexity", e["test_perplexity"])
        d_acc = e["domain_accuracy"] - merged.get("domain_accuracy", e["domain_accuracy"])
        lines.append(f"| {fmt} | {e['size_mb']:.1f} | {e['load_seconds']:.2f} | {e['tokens_per_s_batch1']:.1f} | "
                     f"{e['test_perplexity']:.3f} | {d_ppl:+.3f} | {e['domain_accuracy']:.1f} ± {e['domain_accuracy_se']:.1f} | "
                     f"{d_acc:+.1f} | {tail}")
    atomic_io.write_text(cfg.export.report_md, "\n".join(lines) + "\n")
    atomic_io.write_json(cfg.export.report_json, results)
