"""`loralab run`: prepare -> train -> evaluate -> report, with the time each stage took."""

from __future__ import annotations

import time

from loralab.config import Config
from loralab.data.prepare import prepare_dataset
from loralab.metrics.evaluate import evaluate_model_pair
from loralab.training.recipe import train
from loralab.training.tracking import log_evaluation
from loralab.util import atomic_io, provenance
from loralab.util.cpu import cpu_profile


def run_all(cfg: Config, resume: bool = False) -> dict:
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t0 = time.perf_counter()
    card = prepare_dataset(cfg.data)
    timings["prepare_s"] = round(time.perf_counter() - t0, 1)
    print(f"prepared {card['processed_records']} records: {card['splits']}", flush=True)

    t0 = time.perf_counter()
    result = train(cfg, resume=resume)
    timings["train_s"] = round(time.perf_counter() - t0, 1)
    if result.interrupted:
        return {"interrupted": True, "timings": timings}

    t0 = time.perf_counter()
    results = evaluate_model_pair(cfg)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)

    summary = {
        "timings": timings,
        "machine": cpu_profile(),  # timings differ ~2x between CPU classes (AVX2 fp32 vs native bf16)
        "dataset": card,
        "train": {"steps": result.total_steps, "final_train_loss": result.final_train_loss,
                  "final_eval_loss": result.final_eval_loss},
        "base": {k: results["models"]["base"][k] for k in ("perplexity", "domain_accuracy")},
        "fine_tuned": {k: results["models"]["fine_tuned"][k] for k in ("perplexity", "domain_accuracy")},
        **results["summary"],
        "provenance": provenance.record(cfg.to_dict()),
    }
    atomic_io.write_json(cfg.eval.run_summary_json, summary)
    # The evaluation joins the training's run in train.report_to's trackers (its run id is in train.run_dir).
    log_evaluation(cfg.train, results, [cfg.eval.results_json, cfg.eval.report_md, cfg.eval.run_summary_json])
    print(
        f"done in {timings['total_s'] / 60:.1f} min: answer perplexity {summary['base']['perplexity']:.2f} -> "
        f"{summary['fine_tuned']['perplexity']:.2f} ({summary['perplexity_ratio_base_over_tuned']:.2f}x lower), domain score "
        f"{summary['base']['domain_accuracy']:.1f} -> {summary['fine_tuned']['domain_accuracy']:.1f} above chance "
        f"({summary['domain_accuracy_gain_points']:+.1f} points). Report: {cfg.eval.report_md}",
        flush=True,
    )
    return summary
