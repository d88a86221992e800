"""`loralab analysis`: findings computed from result files, written under experiments/ only."""

from __future__ import annotations

import json

from loralab.studies.analysis import domain_findings, method_findings, separated, write_analysis


def _method(ppl, sd, acc=10.0, params=1000, rss=3000.0, wall=60.0, lr=1e-3, grid=(1e-4, 1e-3, 1e-2)):
    """A method's summary whose eval-split loss (what chooses) orders the methods as its test perplexity does."""
    return {"eval_loss": ppl / 5, "eval_loss_sd": sd / 5, "test_perplexity": ppl, "test_perplexity_sd": sd,
            "domain_accuracy": acc, "domain_accuracy_sd": 2.0,
            "trainable_parameters": params, "adapter_mb": params * 4 / 1e6, "peak_rss_mb": rss, "peak_rss_mb_sd": 0.0,
            "wall_seconds": wall, "tokens_per_s": 300.0, "learning_rate": lr,
            "lr_search": [{"learning_rate": g, "eval_loss": 2.5} for g in grid]}


COMPARISON = {"train_examples": 240, "seeds": [1, 2, 3], "methods": {
    "lora": _method(12.0, 0.3),
    "ia3": _method(12.2, 0.3, params=50, rss=2500),   # within noise of lora, far fewer parameters
    "dora": _method(14.0, 0.2, lr=1e-2),               # clearly worse; lr at the grid's edge
    "lora@nf4": _method(12.1, 0.4, rss=2000, wall=120),
}}


def test_separation_uses_the_seed_standard_error():
    a, b = {"x": 10.0, "x_sd": 1.0}, {"x": 11.0, "x_sd": 1.0}
    assert not separated(a, b, "x", seeds=3)  # 1.0 < 2.776 * sqrt(2/3)
    assert separated(a, {"x": 13.0, "x_sd": 1.0}, "x", seeds=3)


def test_method_findings_name_the_winner_the_ties_and_the_costs():
    text = "\n".join(method_findings(COMPARISON))
    assert "best is lora (eval loss 2.400 ± 0.060; test perplexity 12.00 ± 0.30)" in text
    assert "ia3 (eval loss 2.440" in text.split("Not separable")[1].split("\n")[0]
    assert "beyond seed noise: dora" in text
    assert "fewest trainable parameters: ia3" in text and "lowest peak memory: lora@nf4" in text
    assert "**lora@nf4 against lora:** peak memory 2000 vs 3000 MB (0.67x), training time 2.00x" in text
    assert "edge of the searched range for dora" in text
    assert "Partial" not in text
    partial = dict(COMPARISON, methods_planned=[*COMPARISON["methods"], "full"])
    assert "**Partial comparison:** 4 of 5 planned entries are measured; not yet: full" in method_findings(partial)[0]


def test_analysis_writes_findings_under_experiments_only_and_names_missing_results(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "method_comparison.json").write_text(json.dumps(COMPARISON))
    doc = tmp_path / "submission.md"
    doc.write_text("intro\n<!-- generated:methods (loralab analysis) -->\nstale\n<!-- /generated:methods -->\nend\n")
    before = doc.read_bytes()
    out = write_analysis(tmp_path)
    analysis = out.read_text()
    assert "| lora | 0.001 | 12.00 ± 0.30 |" in analysis
    assert "_Not measured yet: `loralab domains` writes `experiments/domain_transfer.json`._" in analysis
    findings = (tmp_path / "experiments" / "method_findings.md").read_text()
    assert "| lora | 0.001 | 12.00 ± 0.30 |" in findings and "best is lora" in findings
    assert not (tmp_path / "experiments" / "domain_findings.md").exists()  # no domains results yet
    assert doc.read_bytes() == before  # library code never edits the hand-written documents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments", "submission.md"]


def test_domain_findings_are_ratios_to_the_base_and_the_specialists():
    cell = lambda ppl: {"perplexity": ppl}  # noqa: E731
    general = lambda ppl: {"text_perplexity": ppl, "mc_accuracy": 25.0, "mc_accuracy_se": 3.0}  # noqa: E731
    data = {"domains": {"a": {}, "b": {}}, "matrix": {
        "base": {"a": cell(10.0), "b": cell(20.0), "general": general(30.0)},
        "a": {"a": cell(5.0), "b": cell(22.0), "general": general(33.0)},
        "b": {"a": cell(11.0), "b": cell(4.0), "general": general(30.0)},
        "mixture": {"a": cell(6.0), "b": cell(4.4), "general": general(31.5)},
    }}
    text = "\n".join(domain_findings(data))
    assert "**a adapter:** its own test perplexity is 0.50x the base's; on the other domains b 1.10x." in text
    assert "a 1.20x, b 1.10x" in text
    assert "a +10.0 %" in text and "mixture +5.0 %" in text


def test_when_full_fine_tuning_wins_the_findings_price_the_best_adapter():
    methods = {"full": _method(10.0, 0.1, params=100_000, rss=4000, wall=150),
               "rslora": _method(11.0, 0.1, params=1000, rss=3000, wall=100),
               "lora": _method(13.0, 0.1)}
    text = "\n".join(method_findings({"train_examples": 240, "seeds": [1, 2, 3], "methods": methods}))
    assert "Every other method is worse beyond seed noise" in text
    assert "best-quality group" not in text  # a group of one has nothing to choose between
    assert ("**Best adapter:** rslora (eval loss 2.200 ± 0.020; test perplexity 11.00 ± 0.10), 1.10x full "
            "fine-tuning's perplexity with 100x fewer trainable parameters, 0.0 MB against 0 MB on disk, 0.75x the peak "
            "memory and 0.67x the training time. "
            "Every other adapter is worse beyond seed noise.") in text
    methods["dora"] = _method(11.1, 0.1)
    text = "\n".join(method_findings({"train_examples": 240, "seeds": [1, 2, 3], "methods": methods}))
    assert "Not separable from it: dora (eval loss 2.220 ± 0.020; test perplexity 11.10 ± 0.10)." in text


def test_findings_name_the_smallest_adapter_and_the_rank_that_is_enough():
    sweep = {"points": [{"factor": "lora.r", "resolved": r, "eval_perplexity": ppl}
                        for r, ppl in [(1, 11.3), (4, 10.8), (16, 10.7), (64, 11.2)]]
             + [{"factor": "train.learning_rate", "resolved": 1e-3, "eval_perplexity": 9.0}]}
    comparison = dict(COMPARISON, methods=dict(COMPARISON["methods"], ia3=_method(14.0, 0.1, params=50)))
    text = "\n".join(method_findings(comparison, sweep))
    assert "**Smallest adapter:** ia3 (50 parameters, 0.00 MB on disk, 1.17x the best perplexity)." in text
    assert ("the smallest rank within 2 % of the best eval perplexity is 4 (perplexity 10.80 vs best 10.70 over ranks "
            "1, 4, 16, 64)") in text


def test_throughput_gets_one_section_per_measured_cpu_class_and_names_the_others(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    (results / "stale").mkdir(parents=True)
    (results / "stale" / "train_throughput_old.json").write_text("{}")  # stale results are not quoted
    record = {"command": "python benchmarks/train_throughput.py --examples 8 --seeds 42",
              "cpu": {"cpu": "Some CPU", "cores": 2, "class": "avx2"},
              "matmul_peak_gflops": {"float32": 150.0, "bfloat16": 1.7}, "header": "8 examples",
              "table": ["| path | tokens/s |", "|---|---:|", "| loralab default | 140.0 |"],
              "targets": "targets, loralab default vs the best baseline (TRL SFTTrainer): tokens/s >= 2.0x: 1.20x (MISSED)"}
    (results / "train_throughput_avx2.json").write_text(json.dumps(record))
    analysis = write_analysis(tmp_path).read_text()
    section = analysis.split("## Training throughput")[1].split("\n## ")[0]
    assert "### CPU class avx2: Some CPU, 2 cores" in section
    assert "| loralab default | 140.0 |" in section and "1.20x (MISSED)" in section
    assert "raw results: `benchmarks/results/train_throughput_avx2.json`" in section
    assert "Not measured with this benchmark: CPU class avx512-bf16, avx512." in section


def test_analysis_quotes_the_pruning_study_findings_and_its_command(tmp_path):
    (tmp_path / "experiments").mkdir()
    study = {"machine": {"cpu": "Test CPU", "cores": 2, "bf16": False}, "source": "base + lora",
             "findings": ["- Zeroed weights do not pay on this CPU by themselves."]}
    (tmp_path / "experiments" / "pruning_study.json").write_text(json.dumps(study))
    analysis = write_analysis(tmp_path).read_text()
    section = analysis[analysis.index("## Pruning"):]
    assert "Command: `loralab prune --study` on Test CPU, 2 cores, without native bf16" in section
    assert "- Zeroed weights do not pay on this CPU by themselves." in section
