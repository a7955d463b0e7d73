"""Phase 2, rollouts: sample several trajectories per question from the SFT policy and score them.

    python -m app rollouts                                             # embedded demo
    python -m app rollouts --preset abel-7b --store s3://bucket/gsm8k --run-id r1 \\
        --samples-per-question 8 --question-batch-size 256             # one pod, all its GPUs
    python -m app rollouts --n_samples 500 --question_batch_size 16    # the first 500 questions
    # N pods of an Indexed Job: each takes shard JOB_COMPLETION_INDEX of N, then
    python -m app merge --phase rollouts --num-shards N ...            # combine the shards (merge_shards)

The policy is base + SFT adapter, served unmerged (with `--round r` >= 2: base + round
r-1's DPO adapter, the latest policy; output under `<run>/round-<r>/rollouts/`). Each
question is asked under the prompt variants (direct, reflective, deliberative); `--samples-per-question` trajectories
per question are spread evenly over them (or set `--samples-per-variant`). `--n-samples N`
(the reference guide's flag, = `--rollout-limit N`) takes the first N questions. The total
number of trajectories is printed before generating; more than 200,000 (or more
than 64 per question) is refused unless `--confirm-large-rollout`. Each trajectory
is scored: `correct` (extracted answer vs gold), reasoning `quality` (are its written
equations right, does it show steps), a `length_penalty`, and the composite `reward`.
A trajectory cut off by `--max-new-tokens` is kept but marked `truncated` and never
counted correct.

Output `rollouts.jsonl`: one line per question, in question order:
    {"id", "question", "gold", "solution" (the reference), "trajectories": [{"variant", "prompt", "full_text", "answer",
     "num_tokens", "truncated", "correct", "quality", "length_penalty", "reward"}, ...]}
plus `summary.json` (accuracy by variant, reward statistics, throughput).

Progress is saved in chunks of `--chunk-size` questions: each finished chunk's records go
to `<phase uri>/checkpoints/<questions done>/` (app/checkpoints.py). A restarted Job loads
the finished chunks and generates only the rest. A question's sampling seed is its
position in the list, so with vLLM its samples do not depend on the chunking (with HF
generate neither, as long as --chunk-size is a multiple of --question-batch-size).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from app import artifacts, checkpoints, tracking
from app.config import RunConfig, option, require
from app.data import ACCEPT_UNMARKED_HELP, load_problems, read_jsonl, write_jsonl
from app.errors import StorageError
from app.generation import Sampling, make_generator
from app.log import log
from app.models import check_adapter_matches, gpu_bf16, has_cuda, load_tokenizer, merge_adapter, resolve_base_model
from app.phases import ROUND_HELP, begin, policy_input, policy_uri
from app.prompts import VARIANTS, build_prompt
from app.rewards import RewardWeights, score_trajectory
from app.shards import default_shard_index, output_uri, shard_slice
from app.timing import PhaseTimer


# A full GSM8K train set at 8 per question is 59,784 trajectories; 3.7 M (the guide's --n-samples 500
# read as per question) is a mistake to catch before the GPUs spend a day on it.
LARGE_ROLLOUT = 200_000
MAX_PER_QUESTION = 64


@dataclass
class Config(RunConfig):
    rollout_data: str = option("synthetic:160", "questions to roll out: hf:openai/gsm8k (train), synthetic:N, or JSONL",
                               location=True)
    rollout_limit: int = option(0, "roll out only the first N questions (0 = all)", aliases=("--n-samples",))
    prompt_format: str = option("abel", "prompt format: abel, plain or chat")
    variants: list[str] = option(["direct", "reflective", "deliberative"], "prompt variants, comma-separated")
    round: int = option(1, ROUND_HELP)
    samples_per_question: int = option(8, "trajectories per question, spread over the variants as evenly as they "
                                       "divide (8 over 3 variants: 3, 3, 2)")
    samples_per_variant: int = option(0, "trajectories per variant (overrides --samples-per-question when > 0)")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling top-p")
    max_new_tokens: int = option(512, "longest trajectory in tokens; longer ones are marked truncated")
    question_batch_size: int = option(64, "questions per generation batch (bounds memory; lower it on OOM)")
    backend: str = option("auto", "generation backend: auto (vLLM if importable), vllm or hf")
    policy_serving: str = option("lora", "how the SFT policy is served: 'lora' (base + adapter, applied on the fly) "
                                 "or 'merged' (the adapter merged into the weights once, in fp32, then served as a "
                                 "plain model: no LoRA kernels; docs/PERFORMANCE.md compares them)")
    max_num_seqs: int = option(0, "vllm backend: most sequences in flight (0 = vLLM's default)")
    request_seeds: bool = option(True, "vllm backend: seed every request (samples independent of batching; slower: "
                                 "vLLM draws seeded noise one sequence at a time) instead of the engine once")
    hf_static_cache: bool = option(True, "hf backend on a GPU: static KV cache, decoding step compiled into CUDA "
                                   "graphs (2x the eager rate on a 7B; ~40 s of compilation first)")
    bf16: bool = option(True, "generate in bf16 on GPUs")
    quality_weight: float = option(0.5, "reward weight of reasoning quality")
    length_weight: float = option(0.2, "reward weight of the length penalty")
    target_tokens: int = option(200, "trajectories up to this length get no length penalty")
    num_shards: int = option(1, "split the questions into this many shards (one per Indexed Job pod)")
    shard_index: int = option(None, "which shard this process runs (default: $JOB_COMPLETION_INDEX or 0)")
    confirm_large_rollout: bool = option(False, f"allow more than {LARGE_ROLLOUT:,} trajectories in all, or more than "
                                         f"{MAX_PER_QUESTION} per question")
    chunk_size: int = option(512, "save progress every N questions; a restarted Job redoes at most one chunk")
    max_reject_rate: float = option(0.01, "fail if more than this share of the question rows is unusable")
    accept_answer_without_marker: bool = option(False, ACCEPT_UNMARKED_HELP)

    def __post_init__(self):
        if self.shard_index is None:
            self.shard_index = default_shard_index()

    def validate(self) -> None:
        super().validate()
        require(self.round >= 1, f"--round must be >= 1, got {self.round}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        require(not unknown, f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        require(bool(self.variants), "--variants must name at least one variant")
        require(self.samples_per_variant >= 0, "--samples-per-variant must be >= 0")
        require(self.samples_per_variant > 0 or self.samples_per_question >= len(self.variants),
                f"--samples-per-question {self.samples_per_question} must be >= the number of variants "
                f"({len(self.variants)})")
        require(self.confirm_large_rollout or self.per_variant() * len(self.variants) <= MAX_PER_QUESTION,
                f"{self.per_variant() * len(self.variants)} trajectories per question is more than "
                f"{MAX_PER_QUESTION}; --n-samples is the number of questions, --samples-per-question the "
                "trajectories for each (or pass --confirm-large-rollout)")
        require(0 <= self.temperature <= 5, f"--temperature must be in [0, 5], got {self.temperature}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
        require(self.question_batch_size >= 1, "--question-batch-size must be >= 1")
        require(self.backend in ("auto", "hf", "vllm"), f"--backend {self.backend!r}: use auto, hf or vllm")
        require(self.policy_serving in ("lora", "merged"), f"--policy-serving {self.policy_serving!r}: use lora or merged")
        require(self.max_num_seqs >= 0, "--max-num-seqs must be >= 0 (0 = vLLM's default)")
        require(self.num_shards >= 1 and 0 <= self.shard_index < self.num_shards,
                f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})")
        require(self.rollout_limit >= 0, "--rollout-limit must be >= 0")
        require(self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}")
        require(0 <= self.max_reject_rate <= 1, "--max-reject-rate must be in [0, 1]")

    def per_variant(self) -> int:
        """The most samples any one variant gets."""
        return max(self.samples_by_variant())

    def samples_by_variant(self) -> list[int]:
        """Samples per variant, in --variants order: --samples-per-variant each, or --samples-per-question spread
        as evenly as they divide (the first variants take the remainder)."""
        k = len(self.variants)
        if self.samples_per_variant:
            return [self.samples_per_variant] * k
        return [self.samples_per_question // k + (1 if i < self.samples_per_question % k else 0) for i in range(k)]

    def identity(self) -> dict:
        values = super().identity()
        values.pop("question_batch_size")  # how we batch does not change what is sampled
        values.pop("chunk_size")  # nor how often progress is saved
        values.pop("confirm_large_rollout")  # nor a confirmation
        return values


def main(config: Config) -> dict | None:
    out_uri = output_uri(config, "rollouts")
    if (published := begin("rollouts", out_uri, config, f"shard={config.shard_index}/{config.num_shards}")) is not None:
        return published
    start_uri = policy_uri(config.store, config.run_id, config.round)  # round 1: SFT; round r: DPO of round r-1
    start_dir, start_manifest = artifacts.fetch(start_uri)

    started = time.time()
    timer = PhaseTimer()
    problems, report = load_problems(config.rollout_data, split="train", limit=config.rollout_limit or None,
                                     max_reject_rate=config.max_reject_rate, seed=config.seed,
                                     accept_unmarked=config.accept_answer_without_marker)
    problems = shard_slice(problems, config.shard_index, config.num_shards)
    total = len(problems) * sum(config.samples_by_variant())
    log(f"data: {report.line()}; this shard rolls out {len(problems)} questions x "
        f"{sum(config.samples_by_variant())} samples ("
        + ", ".join(f"{n} {v}" for v, n in zip(config.variants, config.samples_by_variant()))
        + f") = {total:,} trajectories")
    require(config.confirm_large_rollout or total <= LARGE_ROLLOUT,
            f"{total:,} trajectories is more than {LARGE_ROLLOUT:,} ({len(problems)} questions x "
            f"{sum(config.samples_by_variant())} per question); check --n-samples (questions) and "
            "--samples-per-question, or pass --confirm-large-rollout")

    config_hash = artifacts.config_hash(config.identity())
    done = resume_chunks(out_uri, config_hash, problems)

    def save_chunk(end: int, chunk_records: list[dict]) -> None:
        with artifacts.workdir("rollouts-chunk") as chunk_dir:
            write_jsonl(chunk_dir / "rollouts.jsonl", chunk_records)
            meta = {"start": end - len(chunk_records), "end": end, "ids": [r["id"] for r in chunk_records]}
            try:
                checkpoints.save_checkpoint(out_uri, end, chunk_dir, config_hash, meta=meta, keep=None)
            except StorageError as exc:  # generation goes on; a restart would redo this chunk
                log(f"warning: progress at {end}/{len(problems)} questions not saved ({exc})")
                return
        log(f"rollouts: progress saved, {end}/{len(problems)} questions done")

    base_path, base_lineage = resolve_base_model(config.base_model, config.store, config.run_id, log=log,
                                                 publish_bf16=gpu_bf16(config.bf16))
    records, stats_line, stats = generate_and_score(config, base_path, str(start_dir), problems, done=done,
                                                    on_chunk=save_chunk, timer=timer)
    log(stats_line)

    summary = summarize(records)
    summary["throughput"] = stats
    summary["rejected_rows"] = report.rejected
    summary["timing"] = timer.metrics(tokens=stats.get("tokens") or 0, policy_serving=config.policy_serving,
                                      start=stats.get("start_times"))
    log("rollouts: timing " + json.dumps(summary["timing"]))
    log("rollouts: " + ", ".join(f"{k} {v}" for k, v in summary["accuracy_by_variant"].items())
        + f"; mean reward {summary['mean_reward']}; truncated {summary['truncated']}")

    with artifacts.workdir("rollouts") as work:
        write_jsonl(work / "rollouts.jsonl", records)
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        manifest = artifacts.publish(
            work, out_uri, phase="rollouts", config=config.to_dict(), identity=config.identity(),
            inputs={policy_input(config.round): artifacts.lineage_entry(start_uri, start_manifest), "base": base_lineage,
                    "rollout_data": {"spec": config.rollout_data}},
            metrics={k: v for k, v in summary.items() if k != "throughput"},
            timings={"total_s": round(time.time() - started, 1), "generation": stats}, overwrite=config.force)
    checkpoints.clear_checkpoints(out_uri)  # the artifact is what counts now
    tracking.log_summary(config, tracking.shard_phase("rollouts", config), summary)
    log(f"rollouts: published {out_uri}")
    return manifest


def resume_chunks(out_uri: str, config_hash: str, problems) -> list[dict]:
    """Records of the questions finished by an earlier, interrupted attempt (a prefix of `problems`)."""
    records: list[dict] = []
    for end, path in checkpoints.complete_checkpoints(out_uri, config_hash, log=log):
        info = checkpoints.checkpoint_info(path)
        expected = [p.id for p in problems[len(records):end]]
        if info.get("start") != len(records) or info.get("ids") != expected:
            log(f"rollouts: saved chunk {path} does not continue questions [0, {len(records)}) of this data; "
                "redoing the questions from there on")
            break
        records += [row for _, row in read_jsonl(path / "rollouts.jsonl")]
    if records:
        log(f"rollouts: resuming with {len(records)}/{len(problems)} questions already done")
    return records


def generate_and_score(config: Config, base_path: str, sft_dir: str, problems, done: list[dict] | None = None,
                       on_chunk=None, timer=None) -> tuple[list[dict], str, dict]:
    """Records for every problem, in order: `done` (already finished) first, the rest generated
    `config.chunk_size` questions at a time, each finished chunk handed to `on_chunk(end, records)`
    unless it is the last one. `timer` (app.timing): the policy's merge, the generator's start
    (load, compile) and the generation itself (work) are added to it."""
    import torch

    timer = timer or PhaseTimer()
    records = list(done or [])
    if len(records) == len(problems):
        return records, "rollouts: nothing left to generate", {"backend": None, "resumed_questions": len(records)}
    tokenizer = load_tokenizer(base_path)
    from transformers import AutoConfig

    check_adapter_matches(sft_dir, AutoConfig.from_pretrained(base_path), "sft adapter")
    weights = RewardWeights(quality=config.quality_weight, length=config.length_weight,
                            target_tokens=config.target_tokens)
    resumed = len(records)
    with contextlib.ExitStack() as stack:
        policy, adapters, adapter = base_path, {"sft": sft_dir}, "sft"
        if config.policy_serving == "merged":
            merged_dir = merged_policy_dir(base_path, sft_dir)
            stack.callback(shutil.rmtree, merged_dir, True)
            with timer.part("merge"):
                merge_adapter(base_path, sft_dir, merged_dir, bf16=config.bf16, log=log)
            policy, adapters, adapter = str(merged_dir), {}, None
        generator = make_generator(config.backend, policy, adapters, bf16=config.bf16,
                                   batch_size=config.question_batch_size * config.per_variant(),
                                   max_model_len=config.max_new_tokens + 512, seed=config.seed,
                                   static_cache=config.hf_static_cache and has_cuda(),
                                   max_num_seqs=config.max_num_seqs or None, request_seeds=config.request_seeds)
        stack.callback(generator.close)
        start_times = generator.start_times
        timer.add_start(start_times)
        for start in range(resumed, len(problems), config.chunk_size):
            chunk = problems[start:start + config.chunk_size]
            chunk_records = [{"id": p.id, "question": p.question, "gold": p.gold, "solution": p.answer,
                              "trajectories": []} for p in chunk]
            for v_index, (variant, n) in enumerate(zip(config.variants, config.samples_by_variant())):
                if n == 0:
                    continue
                prompts = [build_prompt(p.question, variant, config.prompt_format, tokenizer) for p in chunk]
                # + start: a question's seed is its position, whichever chunk it falls in.
                sampling = Sampling(n=n, temperature=config.temperature, top_p=config.top_p,
                                    max_new_tokens=config.max_new_tokens, seed=config.seed * 1000 + v_index + start)
                with timer.part("work"):
                    outputs = generator.generate(prompts, sampling, adapter=adapter, desc=f"rollouts/{variant}")
                for record, prompt, completions, problem in zip(chunk_records, prompts, outputs, chunk):
                    for completion in completions:
                        score = score_trajectory(completion.text, problem.gold, completion.num_tokens,
                                                 config.max_new_tokens, completion.truncated, weights)
                        record["trajectories"].append({
                            "variant": variant, "prompt": prompt, "full_text": completion.text,
                            "answer": score.answer, "num_tokens": completion.num_tokens,
                            "truncated": completion.truncated, "correct": score.correct, "quality": score.quality,
                            "length_penalty": score.length_penalty, "reward": score.reward})
            records += chunk_records
            if on_chunk is not None and len(records) < len(problems):
                on_chunk(len(records), chunk_records)
        stats = {"backend": generator.name, **generator.stats.to_dict(), "resumed_questions": resumed,
                 "start_times": start_times}
        return records, generator.stats.line(generator.name), stats


def merged_policy_dir(base_path: str, sft_dir: str) -> Path:
    """Where the merged policy is written: a fresh directory whose name depends only on the base model
    and the adapter, so vLLM's compile cache (keyed partly by the model's path) is found again by the
    next pod that serves the same policy."""
    import hashlib
    import os
    import tempfile

    key = hashlib.sha256(f"{Path(base_path).resolve()}|{Path(sft_dir).resolve()}".encode()).hexdigest()[:16]
    path = Path(os.environ.get("PIPELINE_WORKDIR", tempfile.gettempdir())) / f"policy-merged-{key}"
    shutil.rmtree(path, ignore_errors=True)  # a crashed attempt's half-written copy
    path.mkdir(parents=True)
    return path


def summarize(records: list[dict]) -> dict:
    trajectories = [t for r in records for t in r["trajectories"]]
    by_variant: dict[str, list[bool]] = {}
    for t in trajectories:
        by_variant.setdefault(t["variant"], []).append(t["correct"])
    rewards = [t["reward"] for t in trajectories]
    return {
        "questions": len(records),
        "trajectories": len(trajectories),
        "accuracy": round(sum(t["correct"] for t in trajectories) / max(1, len(trajectories)), 4),
        "accuracy_by_variant": {k: round(sum(v) / len(v), 4) for k, v in by_variant.items()},
        "questions_with_a_correct_trajectory": sum(any(t["correct"] for t in r["trajectories"]) for r in records),
        "questions_all_correct": sum(bool(r["trajectories"]) and all(t["correct"] for t in r["trajectories"])
                                     for r in records),
        "mean_reward": round(sum(rewards) / max(1, len(rewards)), 4),
        "truncated": sum(t["truncated"] for t in trajectories),
        "mean_tokens": round(sum(t["num_tokens"] for t in trajectories) / max(1, len(trajectories)), 1),
    }


def merge_shards(shards: list[tuple[Path, dict]], work: Path, run_id: str) -> dict:
    """Join the shards' (local dir, manifest) in shard order, which is question order, into `work`
    as one artifact's files; returns its metrics."""
    records = [row for path, _ in shards for _, row in read_jsonl(path / "rollouts.jsonl")]
    write_jsonl(work / "rollouts.jsonl", records)
    summary = summarize(records)
    summary["throughput"] = [manifest.get("timings", {}).get("generation") for _, manifest in shards]
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"merge rollouts: {len(records)} questions from {len(shards)} shards")
    return {k: v for k, v in summary.items() if k != "throughput"}
