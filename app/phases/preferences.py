"""Phase 3, preferences: turn scored rollouts into chosen/rejected pairs for DPO.

    python -m app preferences                                          # embedded demo
    python -m app preferences --store s3://bucket/gsm8k --run-id r1 --quality-threshold 0.2

Two kinds of pair, per question:
- correctness: a correct trajectory (chosen) against an incorrect one (rejected);
  the best-rewarded correct ones meet the worst-rewarded incorrect ones first.
- quality: among correct trajectories, one whose reward beats another's by at least
  `--quality-threshold` (better reasoning or a shorter path to the same answer).
- gold_anchored (`--gold-anchored`): where a question has no correct trajectory, the
  reference solution (GSM8K's, reformatted as SFT taught it: no calculator annotations,
  ending in `#### <number>`) is chosen against a wrong trajectory. Hard questions, where
  the policy never answers right, then still teach something; so does a policy that
  answers nothing right at all (a random-weight model in `python -m app rehearse`).
  Wrong trajectories with a parseable answer are used first (lowest reward first), then
  ones without an answer, then truncated ones: here a trajectory cut off at the token limit
  is a failure to answer, and the chosen side is the reference, never a cut-off text.

Rules every sampled pair obeys: chosen and rejected differ in text; chosen's reward is higher;
neither was truncated nor lacks a parseable answer (those are excluded and counted). A
gold-anchored pair's chosen side is the reference (no reward: `chosen_reward` and `margin`
are null, `chosen_variant` is "reference").
`--max-*-pairs-per-question` caps how much one question can weigh. The pair's prompt
is the `direct` variant's prompt, the one the model is evaluated and deployed with.
`--pair-variants direct` pairs only the trajectories sampled under that prompt (on-policy for
it); by default every variant's trajectories are paired. The summary counts the pairs' chosen
and rejected sides by the variant they were sampled under.

Output `preferences.jsonl`: {"prompt", "chosen", "rejected", "type", "margin",
"question_id", "chosen_reward", "rejected_reward", "chosen_variant", "rejected_variant"}
and `summary.json` with counts by type and what was excluded.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass

from app import artifacts, tracking
from app.config import RunConfig, option, require
from app.data import read_jsonl, write_jsonl
from app.errors import InputError
from app.log import log
from app.models import load_tokenizer, resolve_base_model
from app.phases import ROUND_HELP, begin
from app.prompts import VARIANTS, build_prompt, sft_target


@dataclass
class Config(RunConfig):
    prompt_format: str = option("abel", "prompt format of the pair prompts: abel, plain or chat")
    round: int = option(1, ROUND_HELP)
    quality_threshold: float = option(0.15, "least reward gap between two correct trajectories for a quality pair")
    max_correctness_pairs_per_question: int = option(4, "cap on correct-vs-incorrect pairs per question")
    max_quality_pairs_per_question: int = option(2, "cap on quality pairs per question")
    gold_anchored: bool = option(False, "where a question has no correct trajectory, pair the reference solution "
                                 "(chosen) against wrong trajectories (rejected)")
    max_gold_pairs_per_question: int = option(1, "cap on gold-anchored pairs per question (with --gold-anchored)")
    pair_variants: list[str] = option([], "pair only trajectories sampled under these prompt variants, e.g. 'direct' "
                                      "(the pairs' prompt); empty: every variant's", added=True)

    def validate(self) -> None:
        super().validate()
        bad = [v for v in self.pair_variants if v not in VARIANTS]
        require(not bad, f"--pair-variants {','.join(bad)}: choose from {', '.join(VARIANTS)}")
        require(self.round >= 1, f"--round must be >= 1, got {self.round}")
        require(self.quality_threshold >= 0, f"--quality-threshold must be >= 0, got {self.quality_threshold}")
        require(self.max_correctness_pairs_per_question >= 0 and self.max_quality_pairs_per_question >= 0
                and self.max_gold_pairs_per_question >= 0, "pair caps must be >= 0")
        require(self.max_correctness_pairs_per_question + self.max_quality_pairs_per_question
                + (self.max_gold_pairs_per_question if self.gold_anchored else 0) > 0,
                "at least one pair cap must be > 0")


def main(config: Config) -> dict | None:
    out_uri = artifacts.phase_uri(config.store, config.run_id, "preferences", config.round)
    if (published := begin("preferences", out_uri, config)) is not None:
        return published
    started = time.time()
    rollouts_uri = artifacts.phase_uri(config.store, config.run_id, "rollouts", config.round)
    rollouts_dir, rollouts_manifest = artifacts.fetch(rollouts_uri)
    records = read_rollouts(rollouts_dir / "rollouts.jsonl", need_solution=config.gold_anchored)

    tokenizer = None
    if config.prompt_format == "chat":
        tokenizer = load_tokenizer(resolve_base_model(config.base_model, config.store, config.run_id, log=log)[0])
    pairs, summary = build_pairs(records, config, tokenizer)
    for line in describe(summary, config):
        log(line)
    if not pairs:
        raise InputError("preferences: no pairs could be made from the rollouts; " + summary["why_no_pairs"])

    with artifacts.workdir("preferences") as work:
        write_jsonl(work / "preferences.jsonl", pairs)
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        manifest = artifacts.publish(
            work, out_uri, phase="preferences", config=config.to_dict(), identity=config.identity(),
            inputs={"rollouts": artifacts.lineage_entry(rollouts_uri, rollouts_manifest)}, metrics=summary,
            timings={"total_s": round(time.time() - started, 1)}, overwrite=config.force)
    tracking.log_summary(config, "preferences", summary)
    log(f"preferences: published {out_uri}")
    return manifest


REQUIRED_TRAJECTORY_FIELDS = {"full_text": str, "correct": bool, "reward": (int, float), "num_tokens": int}


def read_rollouts(path, need_solution: bool = False) -> list[dict]:
    """rollouts.jsonl, checked field by field so a bad line is named, not skipped.
    `need_solution`: every record must carry the reference solution (gold-anchored pairs)."""
    records = []
    for line_number, record in read_jsonl(path):
        for field in ("id", "question", "trajectories", *(("solution",) if need_solution else ())):
            if field not in record:
                hint = " (rollouts made before reference solutions were recorded: rerun rollouts with --force)" \
                    if field == "solution" else ""
                raise InputError(f"{path}:{line_number}: missing field '{field}'{hint}")
        if need_solution and not (isinstance(record["solution"], str) and record["solution"].strip()):
            raise InputError(f"{path}:{line_number}: field 'solution' must be a non-empty string")
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
    rng = random.Random(config.seed)
    pairs: list[dict] = []
    excluded = {"truncated": 0, "no_answer": 0}
    largest_quality_gap = 0.0
    all_correct = all_wrong = 0
    gold_rejected = {"wrong_answer": 0, "no_answer": 0, "truncated": 0}
    no_correct = 0
    variants = set(config.pair_variants)
    left_out = 0
    for record in records:
        usable, unusable = [], []
        trajectories = [t for t in record["trajectories"] if not variants or t.get("variant") in variants]
        left_out += len(record["trajectories"]) - len(trajectories)
        record = {**record, "trajectories": trajectories}
        for t in trajectories:
            if t.get("truncated"):
                excluded["truncated"] += 1
                unusable.append(t)
            elif t.get("answer") is None:
                excluded["no_answer"] += 1
                unusable.append(t)
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

        lacks_correct = bool(record["trajectories"]) and not any(t["correct"] for t in record["trajectories"])
        no_correct += lacks_correct
        if config.gold_anchored and lacks_correct:
            for kind, rejected in _gold_rejected(wrong, unusable, config.max_gold_pairs_per_question):
                chosen = _reference(record)
                if chosen.strip() != rejected["full_text"].strip():
                    pairs.append(_pair(record, prompt, chosen, rejected, "gold_anchored"))
                    gold_rejected[kind] += 1

        made = 0
        for i, hi in enumerate(correct):
            for lo in reversed(correct[i + 1:]):
                gap = hi["reward"] - lo["reward"]
                largest_quality_gap = max(largest_quality_gap, gap)
                if made < config.max_quality_pairs_per_question and gap >= config.quality_threshold and gap > 0:
                    pairs.append(_pair(record, prompt, hi, lo, "quality"))
                    made += 1
    rng.shuffle(pairs)
    counts = {kind: sum(p["type"] == kind for p in pairs) for kind in PAIR_TYPES}
    summary = {"pairs": len(pairs), "by_type": counts, "questions": len(records),
               "gold_anchored": {"enabled": config.gold_anchored, "rejected_by_kind": gold_rejected},
               "questions_all_correct": all_correct, "questions_all_wrong": all_wrong,
               "questions_without_correct": no_correct,
               "excluded_trajectories": excluded, "largest_quality_gap": round(largest_quality_gap, 4),
               "quality_threshold": config.quality_threshold,
               "pair_variants": sorted(variants) or "all", "trajectories_of_other_variants": left_out,
               "by_variant": {side: dict(sorted(Counter(p[f"{side}_variant"] for p in pairs).items()))
                              for side in ("chosen", "rejected")}}
    summary["why_no_pairs"] = _why_no_pairs(summary) if not pairs else ""
    return pairs, summary


PAIR_TYPES = ("correctness", "quality", "gold_anchored")


def _reference(record: dict) -> str:
    """The reference solution as SFT taught the policy to write it (what the prompt format expects next)."""
    return sft_target(record["solution"])


def _gold_rejected(wrong: list[dict], unusable: list[dict], cap: int):
    """(kind, trajectory) for up to `cap` distinct wrong trajectories: parseable wrong answers first
    (lowest reward first), then ones with no answer, then truncated ones."""
    no_answer = [t for t in unusable if not t.get("truncated")]
    truncated = [t for t in unusable if t.get("truncated")]
    ranked = [("wrong_answer", t) for t in wrong] + \
        [("no_answer", t) for t in _unique_texts(sorted(no_answer, key=lambda t: t["reward"]))] + \
        [("truncated", t) for t in _unique_texts(sorted(truncated, key=lambda t: t["reward"]))]
    seen: set[str] = set()
    out = []
    for kind, t in ranked:
        key = t["full_text"].strip()
        if key in seen:
            continue
        seen.add(key)
        out.append((kind, t))
        if len(out) >= cap:
            break
    return out


def _unique_texts(trajectories: list[dict]) -> list[dict]:
    seen, out = set(), []
    for t in trajectories:
        key = t["full_text"].strip()
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _pair(record: dict, prompt: str, chosen: dict | str, rejected: dict, kind: str) -> dict:
    """A pair row; `chosen` is a trajectory, or the reference text for a gold-anchored pair (no reward)."""
    if isinstance(chosen, str):
        chosen = {"full_text": chosen, "reward": None, "variant": "reference"}
    margin = None if chosen["reward"] is None else round(chosen["reward"] - rejected["reward"], 4)
    return {"prompt": prompt, "chosen": chosen["full_text"], "rejected": rejected["full_text"], "type": kind,
            "margin": margin, "question_id": record["id"],
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
            "chosen_variant": chosen.get("variant"), "rejected_variant": rejected.get("variant")}


def _why_no_pairs(summary: dict) -> str:
    return (f"{summary['questions_all_correct']} questions had only correct trajectories, "
            f"{summary['questions_all_wrong']} only incorrect ones, and no reward gap among correct ones reached "
            f"--quality-threshold {summary['quality_threshold']} (largest: {summary['largest_quality_gap']}). "
            "Sample more per question (--samples-per-question) or at a higher --temperature, or lower --quality-threshold"
            + ("." if summary["gold_anchored"]["enabled"] else
               ", or pair the reference solutions against wrong samples (--gold-anchored)."))


def describe(summary: dict, config: Config) -> list[str]:
    by_type = summary["by_type"]
    gold = f", {by_type['gold_anchored']} gold-anchored" if summary["gold_anchored"]["enabled"] else ""
    lines = [f"pairs: {summary['pairs']} ({by_type['correctness']} correctness, {by_type['quality']} quality{gold}) "
             f"from {summary['questions']} questions; excluded trajectories: {summary['excluded_trajectories']}",
             f"pairs by variant sampled under: chosen {summary['by_variant']['chosen']}, rejected "
             f"{summary['by_variant']['rejected']}" + (f" (only {', '.join(config.pair_variants)}: "
                                                       f"{summary['trajectories_of_other_variants']} trajectories of "
                                                       f"other variants left out)" if config.pair_variants else "")]
    if summary["gold_anchored"]["enabled"]:
        lines.append(f"gold-anchored: {summary['questions_without_correct']} questions had no correct trajectory; "
                     f"rejected sides by kind {summary['gold_anchored']['rejected_by_kind']}")
    if summary["pairs"] and summary["by_type"]["quality"] == 0:
        lines.append(
            f"no quality pairs: among correct trajectories the largest reward gap was "
            f"{summary['largest_quality_gap']}, under --quality-threshold {config.quality_threshold}. Lower the "
            "threshold (e.g. --quality-threshold 0.05), or raise --temperature / --samples-per-question for more varied "
            "solutions. Training goes on with correctness pairs only.")
    return lines
