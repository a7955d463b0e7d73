"""Phase 3, preferences: turn scored rollouts into chosen/rejected pairs for DPO.

    python -m app preferences                                          # embedded demo
    python -m app preferences --store s3://bucket/gsm8k --run-id r1 --quality-threshold 0.2

Two kinds of pair, per question:
- correctness: a correct trajectory (chosen) against an incorrect one (rejected);
  the best-rewarded correct ones meet the worst-rewarded incorrect ones first.
- quality: among correct trajectories, one whose reward beats another's by at least
  `--quality-threshold` (better reasoning or a shorter path to the same answer).

Rules every pair obeys: chosen and rejected differ in text; chosen's reward is higher;
neither was truncated nor lacks a parseable answer (those are excluded and counted).
`--max-*-pairs-per-question` caps how much one question can weigh. The pair's prompt
is the `direct` variant's prompt, the one the model is evaluated and deployed with.

Output `preferences.jsonl`: {"prompt", "chosen", "rejected", "type", "margin",
"question_id", "chosen_reward", "rejected_reward", "chosen_variant", "rejected_variant"}
and `summary.json` with counts by type and what was excluded.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from app import artifacts
from app.config import RunConfig, option, require
from app.errors import InputError
from app.log import log
from app.phases import begin


@dataclass
class Config(RunConfig):
    prompt_format: str = option("abel", "prompt format of the pair prompts: abel, plain or chat")
    quality_threshold: float = option(0.15, "least reward gap between two correct trajectories for a quality pair")
    max_correctness_pairs_per_question: int = option(4, "cap on correct-vs-incorrect pairs per question")
    max_quality_pairs_per_question: int = option(2, "cap on quality pairs per question")

    def validate(self) -> None:
        super().validate()
        require(self.quality_threshold >= 0, f"--quality-threshold must be >= 0, got {self.quality_threshold}")
        require(self.max_correctness_pairs_per_question >= 0 and self.max_quality_pairs_per_question >= 0,
                "pair caps must be >= 0")
        require(self.max_correctness_pairs_per_question + self.max_quality_pairs_per_question > 0,
                "at least one pair cap must be > 0")


def main(config: Config) -> dict | None:
    out_uri = artifacts.phase_uri(config.store, config.run_id, "preferences")
    if (published := begin("preferences", out_uri, config)) is not None:
        return published
    started = time.time()
    rollouts_uri = artifacts.phase_uri(config.store, config.run_id, "rollouts")
    rollouts_dir, rollouts_manifest = artifacts.fetch(rollouts_uri)
    records = read_rollouts(rollouts_dir / "rollouts.jsonl")

    tokenizer = None
    if config.prompt_format == "chat":
        from app.models import load_tokenizer, resolve_base_model

        tokenizer = load_tokenizer(resolve_base_model(config.base_model, config.store, config.run_id, log=log)[0])
    pairs, summary = build_pairs(records, config, tokenizer)
    for line in describe(summary, config):
        log(line)
    if not pairs:
        raise InputError("preferences: no pairs could be made from the rollouts; " + summary["why_no_pairs"])

    from app.data import write_jsonl

    with artifacts.workdir("preferences") as work:
        write_jsonl(work / "preferences.jsonl", pairs)
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        manifest = artifacts.publish(
            work, out_uri, phase="preferences", config=config.to_dict(), identity=config.identity(),
            inputs={"rollouts": artifacts.lineage_entry(rollouts_uri, rollouts_manifest)}, metrics=summary,
            timings={"total_s": round(time.time() - started, 1)}, overwrite=config.force)
    log(f"preferences: published {out_uri}")
    return manifest


REQUIRED_TRAJECTORY_FIELDS = {"full_text": str, "correct": bool, "reward": (int, float), "num_tokens": int}


def read_rollouts(path) -> list[dict]:
    """rollouts.jsonl, checked field by field so a bad line is named, not skipped."""
    from app.data import read_jsonl

    records = []
    for line_number, record in read_jsonl(path):
        for field in ("id", "question", "trajectories"):
            if field not in record:
                raise InputError(f"{path}:{line_number}: missing field '{field}'")
        if not isinstance(record["trajectories"], list):
            raise InputError(f"{path}:{line_number}: field 'trajectories' must be a list")
        for i, t in enumerate(record["trajectories"]):
            for field, kind in REQUIRED_TRAJECTORY_FIELDS.items():
                if field not in t:
                    raise InputError(f"{path}:{line_number}: trajectory {i}: missing field '{field}'")
                if not isinstance(t[field], kind) or (kind is int and isinstance(t[field], bool)):
                    raise InputError(f"{path}:{line_number}: trajectory {i}: field '{field}' has type "
                                     f"{type(t[field]).__name__}")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no rollouts (empty file)")
    return records


def build_pairs(records: list[dict], config: Config, tokenizer=None) -> tuple[list[dict], dict]:
    from app.prompts import build_prompt

    rng = random.Random(config.seed)
    pairs: list[dict] = []
    excluded = {"truncated": 0, "no_answer": 0}
    largest_quality_gap = 0.0
    all_correct = all_wrong = 0
    for record in records:
        usable = []
        for t in record["trajectories"]:
            if t.get("truncated"):
                excluded["truncated"] += 1
            elif t.get("answer") is None:
                excluded["no_answer"] += 1
            else:
                usable.append(t)
        usable = _unique_texts(usable)
        correct = sorted((t for t in usable if t["correct"]), key=lambda t: -t["reward"])
        wrong = sorted((t for t in usable if not t["correct"]), key=lambda t: t["reward"])
        all_correct += bool(correct) and not wrong
        all_wrong += bool(wrong) and not correct
        prompt = build_prompt(record["question"], "direct", config.prompt_format, tokenizer)

        # Round-robin so every correct and every incorrect trajectory is used before any repeats.
        made = 0
        for k in range(max(len(correct), len(wrong)) if correct and wrong else 0):
            if made >= config.max_correctness_pairs_per_question:
                break
            c, w = correct[k % len(correct)], wrong[k % len(wrong)]
            if c["reward"] > w["reward"]:
                pairs.append(_pair(record, prompt, c, w, "correctness"))
                made += 1

        made = 0
        for i, hi in enumerate(correct):
            for lo in reversed(correct[i + 1:]):
                gap = hi["reward"] - lo["reward"]
                largest_quality_gap = max(largest_quality_gap, gap)
                if made < config.max_quality_pairs_per_question and gap >= config.quality_threshold and gap > 0:
                    pairs.append(_pair(record, prompt, hi, lo, "quality"))
                    made += 1
    rng.shuffle(pairs)
    counts = {"correctness": sum(p["type"] == "correctness" for p in pairs),
              "quality": sum(p["type"] == "quality" for p in pairs)}
    summary = {"pairs": len(pairs), "by_type": counts, "questions": len(records),
               "questions_all_correct": all_correct, "questions_all_wrong": all_wrong,
               "excluded_trajectories": excluded, "largest_quality_gap": round(largest_quality_gap, 4),
               "quality_threshold": config.quality_threshold}
    summary["why_no_pairs"] = _why_no_pairs(summary) if not pairs else ""
    return pairs, summary


def _unique_texts(trajectories: list[dict]) -> list[dict]:
    seen, out = set(), []
    for t in trajectories:
        key = t["full_text"].strip()
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _pair(record: dict, prompt: str, chosen: dict, rejected: dict, kind: str) -> dict:
    return {"prompt": prompt, "chosen": chosen["full_text"], "rejected": rejected["full_text"], "type": kind,
            "margin": round(chosen["reward"] - rejected["reward"], 4), "question_id": record["id"],
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
            "chosen_variant": chosen.get("variant"), "rejected_variant": rejected.get("variant")}


def _why_no_pairs(summary: dict) -> str:
    return (f"{summary['questions_all_correct']} questions had only correct trajectories, "
            f"{summary['questions_all_wrong']} only incorrect ones, and no reward gap among correct ones reached "
            f"--quality-threshold {summary['quality_threshold']} (largest: {summary['largest_quality_gap']}). "
            "Sample more per question (--n-samples) or at a higher --temperature, or lower --quality-threshold.")


def describe(summary: dict, config: Config) -> list[str]:
    lines = [f"pairs: {summary['pairs']} ({summary['by_type']['correctness']} correctness, "
             f"{summary['by_type']['quality']} quality) from {summary['questions']} questions; "
             f"excluded trajectories: {summary['excluded_trajectories']}"]
    if summary["pairs"] and summary["by_type"]["quality"] == 0:
        lines.append(
            f"no quality pairs: among correct trajectories the largest reward gap was "
            f"{summary['largest_quality_gap']}, under --quality-threshold {config.quality_threshold}. Lower the "
            "threshold (e.g. --quality-threshold 0.05), or raise --temperature / --n-samples for more varied "
            "solutions. Training goes on with correctness pairs only.")
    return lines
