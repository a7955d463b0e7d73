"""Phase 5, eval: GSM8K test accuracy of base, SFT and DPO side by side.

    python -m app eval                                                 # embedded demo
    python -m app eval --preset abel-7b --store s3://bucket/gsm8k --run-id r1 --platinum

One engine loads the base model once; SFT and DPO are its LoRA adapters, switched per
request, nothing merged. Decoding is greedy with the `direct` prompt, so the numbers
are comparable across models and runs. `--platinum` adds GSM8K-Platinum
(madrylab/gsm8k-platinum), the cleaned test set whose label errors are fixed.

Output `<store>/runs/<run-id>/eval/`:
    <dataset>/<model>.jsonl   per question: id, question, gold, prediction, answer, correct, ...
    summary.json              accuracy with a 95% Wilson interval per dataset and model, and
                              paired comparisons (see below)
    report.md                 the Base -> SFT -> DPO table, with which questions flipped

Two models answered the same questions, so their difference is judged paired, question by
question, not by whether two independent intervals overlap: for base -> sft, sft -> dpo and
base -> dpo, `summary.json["paired"][dataset]["base->sft"]` holds the accuracy difference, a
95% paired-bootstrap interval (10,000 resamples of the questions, seed 0), the questions
fixed and broken, and the exact two-sided McNemar p-value (a binomial test on the flips).

`--rounds N` (with dpo among `--models`) adds each later round's policy, `dpo-r2` ...
`dpo-rN` (from `<run>/round-<r>/dpo/`), to the table; the paired comparisons are then each
model against the one before it (dpo -> dpo-r2, ...) and base and sft against the last.

With `--num-shards N` each pod of an Indexed Job evaluates one shard of the questions;
`python -m app merge --phase eval --num-shards N` joins them (`merge_shards`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from app import artifacts, tracking
from app.config import RunConfig, option, require
from app.data import ACCEPT_UNMARKED_HELP, load_problems, read_jsonl, write_jsonl
from app.generation import Sampling, make_generator
from app.log import log
from app.models import check_adapter_matches, gpu_bf16, load_tokenizer, resolve_base_model
from app.phases import begin
from app.prompts import build_prompt
from app.rewards import answers_match, extract_answer
from app.shards import default_shard_index, output_uri, shard_slice
from app.timing import PhaseTimer

MODEL_ORDER = ("base", "sft", "dpo")


@dataclass
class Config(RunConfig):
    eval_data: str = option("synthetic-test:200", "test problems: hf:openai/gsm8k (test split), synthetic-test:N, JSONL",
                            location=True)
    platinum: bool = option(False, "also evaluate on GSM8K-Platinum (hf:madrylab/gsm8k-platinum)")
    models: list[str] = option(list(MODEL_ORDER), "which models to evaluate: base, sft, dpo (comma-separated)")
    rounds: int = option(1, "rounds of preference training: with dpo, also evaluate each later round's policy "
                         "(dpo-r2 ... dpo-rN, from <run>/round-<r>/dpo/)")
    eval_limit: int = option(0, "evaluate only the first N questions of each dataset (0 = all)")
    prompt_format: str = option("abel", "prompt format: abel, plain or chat")
    max_new_tokens: int = option(512, "longest answer in tokens")
    question_batch_size: int = option(64, "questions per generation batch")
    backend: str = option("auto", "generation backend: auto (vLLM if importable), vllm or hf")
    bf16: bool = option(True, "generate in bf16 on GPUs")
    num_shards: int = option(1, "split the questions into this many shards (one per Indexed Job pod)")
    shard_index: int = option(None, "which shard this process runs (default: $JOB_COMPLETION_INDEX or 0)")
    max_reject_rate: float = option(0.01, "fail if more than this share of a test set's rows is unusable")
    accept_answer_without_marker: bool = option(False, ACCEPT_UNMARKED_HELP)

    def __post_init__(self):
        if self.shard_index is None:
            self.shard_index = default_shard_index()

    def validate(self) -> None:
        super().validate()
        bad = [m for m in self.models if m not in MODEL_ORDER]
        require(not bad and bool(self.models), f"--models {self.models}: choose from {', '.join(MODEL_ORDER)}")
        require(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        require(self.eval_limit >= 0, "--eval-limit must be >= 0")
        require(self.max_new_tokens >= 1 and self.question_batch_size >= 1,
                "--max-new-tokens and --question-batch-size must be >= 1")
        require(self.backend in ("auto", "hf", "vllm"), f"--backend {self.backend!r}: use auto, hf or vllm")
        require(self.num_shards >= 1 and 0 <= self.shard_index < self.num_shards,
                f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})")
        require(0 <= self.max_reject_rate <= 1, "--max-reject-rate must be in [0, 1]")

    def evaluated_models(self) -> list[str]:
        """The models in order: base, sft, dpo (round 1), then dpo-r2 ... dpo-rN."""
        later = [round_model(r) for r in range(2, self.rounds + 1)] if "dpo" in self.models else []
        return [m for m in MODEL_ORDER if m in self.models] + later

    def datasets(self) -> dict[str, str]:
        named = {dataset_name(self.eval_data): self.eval_data}
        if self.platinum:
            named["gsm8k-platinum"] = "hf:madrylab/gsm8k-platinum"
        return named

    def identity(self) -> dict:
        values = super().identity()
        values.pop("question_batch_size")
        return values


def round_model(round: int) -> str:
    """The eval name of round `round`'s DPO policy: dpo, dpo-r2, dpo-r3, ..."""
    return "dpo" if round <= 1 else f"dpo-r{round}"


def model_round(model: str) -> int:
    return 1 if model == "dpo" else int(model.rsplit("-r", 1)[1])


def model_rank(model: str) -> int:
    """Where a model sits in the tables: base, sft, dpo, dpo-r2, ..."""
    return MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER) + model_round(model) - 2


def dataset_name(spec: str) -> str:
    if spec.startswith("hf:"):
        return spec[3:].split("/")[-1]
    if spec.startswith("synthetic"):
        return spec.split(":")[0]
    return os.path.splitext(os.path.basename(spec))[0] or "data"


def main(config: Config) -> dict | None:
    out_uri = output_uri(config, "eval")
    if (published := begin("eval", out_uri, config, f"shard={config.shard_index}/{config.num_shards}")) is not None:
        return published
    started = time.time()
    timer = PhaseTimer()
    adapters, inputs = {}, {}
    for name in config.evaluated_models():
        if name != "base":
            uri = artifacts.phase_uri(config.store, config.run_id, "sft") if name == "sft" else \
                artifacts.phase_uri(config.store, config.run_id, "dpo", model_round(name))
            path, manifest = artifacts.fetch(uri)
            adapters[name], inputs[name] = str(path), artifacts.lineage_entry(uri, manifest)

    datasets = {}
    for name, spec in config.datasets().items():
        problems, report = load_problems(spec, split="test", limit=config.eval_limit or None,
                                         max_reject_rate=config.max_reject_rate, seed=config.seed,
                                     accept_unmarked=config.accept_answer_without_marker)
        datasets[name] = shard_slice(problems, config.shard_index, config.num_shards)
        log(f"data {name}: {report.line()}; this shard evaluates {len(datasets[name])}")

    base_path, inputs["base"] = resolve_base_model(config.base_model, config.store, config.run_id, log=log,
                                                   publish_bf16=gpu_bf16(config.bf16))
    records, stats = generate_answers(config, base_path, adapters, datasets, timer=timer)

    with artifacts.workdir("eval") as work:
        timing = timer.metrics(tokens=stats.get("tokens") or 0, start=stats.get("start_times"))
        log("eval: timing " + json.dumps(timing))
        summary, report = write_results(work, records, config.run_id, throughput=stats, timing=timing)
        manifest = artifacts.publish(work, out_uri, phase="eval", config=config.to_dict(), identity=config.identity(),
                                     inputs=inputs, metrics={k: v for k, v in summary.items() if k != "throughput"},
                                     timings={"total_s": round(time.time() - started, 1), "generation": stats},
                                     overwrite=config.force)
    for line in report.splitlines():
        log(line)
    tracking.log_summary(config, tracking.shard_phase("eval", config), summary)
    log(f"eval: published {out_uri}")
    return manifest


def result_file(dataset: str, model: str) -> str:
    """Where one model's answers on one dataset live inside the artifact."""
    return f"{dataset}/{model}.jsonl"


def write_results(work: Path, records: dict, run_id: str, throughput: dict | None = None,
                  timing: dict | None = None) -> tuple[dict, str]:
    """The artifact's files from {(dataset, model): rows}: the answers, summary.json and report.md;
    `timing` (app.timing) goes into the summary, and so into the manifest's metrics."""
    for (dataset, model), rows in records.items():
        (work / dataset).mkdir(exist_ok=True)
        write_jsonl(work / result_file(dataset, model), rows)
    summary = summarize(records)
    if throughput is not None:
        summary["throughput"] = throughput
    if timing is not None:
        summary["timing"] = timing
    report = render_report(summary, records, run_id)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    (work / "report.md").write_text(report)
    return summary, report


def merge_shards(shards: list[tuple[Path, dict]], work: Path, run_id: str) -> dict:
    """Join the shards' (local dir, manifest) in shard order, which is question order, into `work`
    as one artifact's files; returns its metrics."""
    fields = {f.name for f in dataclasses.fields(Config) if f.init}
    shard_config = Config(**{k: v for k, v in shards[0][1]["config"].items() if k in fields})
    records = {(dataset, model): [row for path, _ in shards for _, row in read_jsonl(path / result_file(dataset, model))]
               for dataset in shard_config.datasets() for model in shard_config.evaluated_models()}
    summary, report = write_results(work, records, run_id)
    for line in report.splitlines():
        log(line)
    log(f"merge eval: {len(records)} result sets from {len(shards)} shards")
    return summary


def generate_answers(config: Config, base_path: str, adapters: dict, datasets: dict, timer=None) -> tuple[dict, dict]:
    """Greedy answers per (dataset, model); `timer` (app.timing) gets the generator's start (load,
    compile) and the generation (work)."""
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(base_path)
    for name, path in adapters.items():
        check_adapter_matches(path, base_config, f"{name} adapter")
    tokenizer = load_tokenizer(base_path)
    timer = timer or PhaseTimer()
    generator = make_generator(config.backend, base_path, adapters, bf16=config.bf16,
                               batch_size=config.question_batch_size, max_model_len=config.max_new_tokens + 512,
                               seed=config.seed)
    start_times = generator.start_times
    timer.add_start(start_times)
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=config.max_new_tokens, seed=config.seed)
    records: dict[tuple[str, str], list[dict]] = {}
    try:
        for dataset, problems in datasets.items():
            prompts = [build_prompt(p.question, "direct", config.prompt_format, tokenizer) for p in problems]
            for model in config.evaluated_models():
                with timer.part("work"):
                    outputs = generator.generate(prompts, sampling, adapter=None if model == "base" else model,
                                                 desc=f"eval/{dataset}/{model}")
                rows = []
                for problem, (completion,) in zip(problems, outputs):
                    answer = extract_answer(completion.text)
                    rows.append({"id": problem.id, "question": problem.question, "gold": problem.gold,
                                 "prediction": completion.text, "answer": answer,
                                 "correct": (not completion.truncated) and answers_match(answer, problem.gold),
                                 "num_tokens": completion.num_tokens, "truncated": completion.truncated})
                records[(dataset, model)] = rows
                accuracy = sum(r["correct"] for r in rows) / max(1, len(rows))
                log(f"eval {dataset}/{model}: {accuracy:.1%} of {len(rows)}")
        log(generator.stats.line(generator.name))
        return records, {"backend": generator.name, **generator.stats.to_dict(), "start_times": start_times}
    finally:
        generator.close()


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: sensible at 0%, 100% and small n, unlike the normal approximation."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar test: under "no difference" each flipped question is a fair coin,
    so p = P(a Binomial(fixed + broken, 1/2) is at least as lopsided as what was seen)."""
    flips = fixed + broken
    if flips == 0:
        return 1.0
    tail = sum(math.comb(flips, k) for k in range(min(fixed, broken) + 1))
    return min(1.0, 2 * tail / 2 ** flips)  # exact integers; Python divides big ints correctly


def paired_bootstrap_interval(fixed: int, broken: int, total: int, resamples: int = 10_000, seed: int = 0,
                              level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the accuracy difference, resampling questions with replacement.

    A question contributes +1 (fixed), -1 (broken) or 0, so a resample of `total` questions is
    a multinomial draw of the three counts: the same distribution as drawing indices, at no cost."""
    import numpy as np

    if total == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(total, [fixed / total, broken / total, (total - fixed - broken) / total], size=resamples)
    differences = (counts[:, 0] - counts[:, 1]) / total
    tail = (1 - level) / 2
    return float(np.quantile(differences, tail)), float(np.quantile(differences, 1 - tail))


def paired_comparison(before: list[dict], after: list[dict], seed: int = 0) -> dict:
    """How `after` differs from `before` on the same questions (rows matched by position, ids checked)."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison needs the same questions: {len(before)} vs {len(after)} rows")
    for b, a in zip(before, after):
        if b.get("id") != a.get("id"):
            raise ValueError(f"paired comparison needs the same questions in the same order: {b.get('id')} vs {a.get('id')}")
    fixed, broken = _flips(before, after)
    total = len(before)
    low, high = paired_bootstrap_interval(fixed, broken, total, seed=seed)
    return {"n": total, "difference": round((fixed - broken) / max(1, total), 4), "ci95": [round(low, 4), round(high, 4)],
            "fixed": fixed, "broken": broken, "mcnemar_p": round(mcnemar_exact_p(fixed, broken), 6),
            "method": f"paired bootstrap (10000 resamples, seed {seed}); exact McNemar"}


def comparisons(models: list[str]) -> list[tuple[str, str]]:
    """Each model against the one before it, then the first against the last (and the second, if
    that adds a pair): base -> sft, sft -> dpo, base -> dpo."""
    pairs = list(zip(models, models[1:]))
    for before in models[:2]:
        if len(models) > 2 and (before, models[-1]) not in pairs:
            pairs.append((before, models[-1]))
    return pairs


def summarize(records: dict) -> dict:
    results: dict[str, dict] = {}
    for (dataset, model), rows in records.items():
        correct = sum(r["correct"] for r in rows)
        low, high = wilson_interval(correct, len(rows))
        results.setdefault(dataset, {})[model] = {
            "accuracy": round(correct / max(1, len(rows)), 4), "correct": correct, "total": len(rows),
            "ci95": [round(low, 4), round(high, 4)], "truncated": sum(r["truncated"] for r in rows)}
    paired: dict[str, dict] = {}
    for dataset, by_model in results.items():
        models = sorted(by_model, key=model_rank)
        paired[dataset] = {f"{b}->{a}": {"before": b, "after": a,
                                         **paired_comparison(records[(dataset, b)], records[(dataset, a)])}
                           for b, a in comparisons(models)}
    return {"results": results, "paired": paired}


def _flips(before: list[dict], after: list[dict]) -> tuple[int, int]:
    fixed = sum((not b["correct"]) and a["correct"] for b, a in zip(before, after))
    broken = sum(b["correct"] and not a["correct"] for b, a in zip(before, after))
    return fixed, broken


def render_report(summary: dict, records: dict, run_id: str) -> str:
    lines = [f"# Evaluation, run `{run_id}`", ""]
    for dataset, by_model in summary["results"].items():
        models = sorted(by_model, key=model_rank)
        lines += [f"## {dataset}", "", "| model | accuracy | 95% CI | correct / total | vs previous |",
                  "|---|---|---|---|---|"]
        previous = None
        for model in models:
            r = by_model[model]
            delta = ""
            if previous is not None:
                change = (r["accuracy"] - by_model[previous]["accuracy"]) * 100
                fixed, broken = _flips(records[(dataset, previous)], records[(dataset, model)])
                delta = f"{change:+.1f} pts ({fixed} fixed, {broken} broken)"
            lines.append(f"| {model} | {r['accuracy']:.1%} | {r['ci95'][0]:.1%} to {r['ci95'][1]:.1%} | "
                         f"{r['correct']} / {r['total']} | {delta} |")
            previous = model
        lines.append("")
        lines.append(" -> ".join(f"{m.upper() if m != 'base' else 'Base'} {by_model[m]['accuracy']:.1%}"
                                 for m in models))
        lines.append("")
        paired = summary.get("paired", {}).get(dataset, {})
        if paired:
            lines += ["Paired, on the same questions (95% interval: paired bootstrap; p: exact McNemar):", "",
                      "| comparison | difference | paired 95% CI | fixed | broken | McNemar p |", "|---|---|---|---|---|---|"]
            for name, c in paired.items():
                lines.append(f"| {c['before']} -> {c['after']} | {c['difference'] * 100:+.1f} pts | "
                             f"{c['ci95'][0] * 100:+.1f} to {c['ci95'][1] * 100:+.1f} pts | {c['fixed']} | "
                             f"{c['broken']} | {_p_value(c['mcnemar_p'])} |")
            lines.append("")
    return "\n".join(lines)


def _p_value(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"
