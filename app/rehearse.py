"""Rehearse the reference case on one GPU before 29 GB are downloaded: a random-weight model of
Abel-7B-002's exact shape through every phase, at the share of the work one of 8 GPUs does.

    python -m app rehearse --store /data/rehearse                      # one GPU, GSM8K from the hub
    python -m app rehearse --store /data/rehearse --from rollouts      # resume: later steps only
    python -m app rehearse --shape tiny --share 0.004 --max-new-tokens 16 --backend hf \\
        --train-data synthetic:2000 --eval-data synthetic-test:200    # the CPU check CI runs

Steps, each resumable (`--from` / `--to`):
  model        write a random-weight model of `--shape` (default abel-7b: MistralForCausalLM, hidden
               4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 32032, sliding window 4096,
               rope theta 1e4) and a tokenizer trained here (app/shapes.py); `--fp32-bin` writes it
               as fp32 .bin shards, as Abel ships, so the phases rehearse the bf16 conversion too
  sft .. eval  every phase through the normal CLI (`python -m app <phase>`, one process each, as
               one Kubernetes Job per phase would), on real GSM8K, at `--share` of the reference
               workload (default 1/8, one GPU of 8): SFT on share x 7,473 questions for 3 epochs,
               rollouts of share x 7,473 questions x 8 samples of up to 512 tokens, preferences
               with gold-anchored pairs (a random model answers nothing right), DPO on all of
               them, eval of base / SFT / DPO on shard 0 of 1/share of GSM8K test
  report       the per-phase table: wall time split into model load, compile or engine start and
               work (each phase measures these itself and records them in its manifest,
               app/timing.py), peak GPU memory, tokens/s; and the projection for the reference
               pipeline on 8 GPUs

A random model writes every sample to the token limit, so the projection rescales generation
and DPO to GSM8K-typical lengths, measured from the gold solutions with the same tokenizer,
and adds GSM8K-Platinum's 1,209 questions to eval unless `--platinum` ran them. It leaves out
what one GPU cannot show: pod scheduling, image pulls, and the 8-GPU collectives (SFT's and
DPO's gradient all-reduce; vLLM runs one engine per GPU and needs none).

vLLM's and torch.compile's caches go to `--cache-dir` (VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR,
TRITON_CACHE_DIR; variables already set win), so each phase after the first compiles less;
`--warm-check` evaluates a second eval shard to measure a warm engine start.
Outputs: `<store>/runs/<run-id>/rehearsal.md` and `rehearsal.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app import artifacts
from app.config import RUN_ID_PATTERN, option, require
from app.errors import EXIT_RETRYABLE, InputError, PipelineError
from app.log import banner, log, log_config
from app.phases import PHASES

STEPS = ("model", "sft", "rollouts", "preferences", "dpo", "eval", "report")
REFERENCE = {"gpus": 8, "share": 0.125, "train_questions": 7473, "sft_epochs": 3, "samples": 8, "max_new_tokens": 512,
             "test_questions": 1319, "platinum_questions": 1209}
WALLS = "rehearsal-walls.json"


@dataclass
class Config:
    store: str = option("runs", "artifact store root: a local directory or s3://bucket/prefix")
    run_id: str = option("rehearse", "run id; artifacts live under <store>/runs/<run-id>/")
    shape: str = option("abel-7b", "model shape: abel-7b (Abel-7B-002's config exactly) or tiny (for a CPU check)")
    model_config: str = option("", "a config.json to use as the shape instead (its vocab_size sizes the tokenizer)")
    model_dir: str = option("", "where to write the random model (default: <store>/rehearse-model-<shape> for a "
                            "local store, ./rehearse-model-<shape> otherwise)")
    fp32_bin: bool = option(False, "write the model as fp32 .bin shards (as Abel ships): the phases then convert it "
                            "once to bf16 safetensors in the store (29 GB of fp32 writes first: minutes)")
    share: float = option(0.125, "share of the reference workload to run (0.125: what one GPU of 8 does)")
    train_data: str = option("hf:openai/gsm8k", "GSM8K train: hf:openai/gsm8k, a JSONL path, s3://, synthetic:N")
    eval_data: str = option("hf:openai/gsm8k", "GSM8K test: hf:openai/gsm8k, a JSONL path, s3://, synthetic-test:N")
    platinum: bool = option(False, "also evaluate GSM8K-Platinum from the hub (else the projection adds it)")
    max_new_tokens: int = option(512, "longest sample in tokens (the reference: 512)")
    samples_per_question: int = option(8, "samples per rollout question (the reference: 8)")
    backend: str = option("auto", "generation backend for rollouts and eval: auto, vllm or hf")
    policy_serving: str = option("merged", "rollouts: serve the SFT policy 'merged' (adapter merged once) or 'lora'")
    request_seeds: bool = option(False, "rollouts: seed every vLLM request (batch-independent samples, slower)")
    max_num_seqs: int = option(0, "rollouts: vLLM's most sequences in flight (0 = vLLM's default)")
    cache_dir: str = option("", "compile caches for vLLM and torch.compile (default: beside the model directory)")
    warm_check: bool = option(False, "evaluate a second eval shard after the first: a warm engine start")
    typical_new_tokens: float = option(0.0, "GSM8K-typical answer length for the projection (0 = measure it from "
                                       "the gold solutions with the model's tokenizer)")
    seed: int = option(0, "random seed for the weights, data order and sampling")
    force: bool = option(False, "redo steps whose output is already there")
    from_step: str = option("model", "first step: " + ", ".join(STEPS), aliases=("--from",))
    to_step: str = option("report", "last step", aliases=("--to",))

    def validate(self) -> None:
        from app.shapes import SHAPES

        require(bool(RUN_ID_PATTERN.match(self.run_id)), f"--run-id {self.run_id!r}: lowercase letters, digits, '-'")
        require(self.shape in SHAPES, f"--shape {self.shape!r}: choose from {', '.join(SHAPES)}")
        if self.model_config:
            path = Path(self.model_config)
            if not path.is_file():
                raise InputError(f"--model-config {self.model_config}: no such file")
            try:
                shape = json.loads(path.read_text())
            except ValueError as exc:
                raise InputError(f"{self.model_config}: not valid JSON ({exc})") from None
            missing = [k for k in ("architectures", "model_type", "vocab_size", "hidden_size") if k not in shape]
            if missing:
                raise InputError(f"{self.model_config}: missing {', '.join(missing)}")
        require(0 < self.share <= 1, f"--share must be in (0, 1], got {self.share}")
        require(self.max_new_tokens >= 1 and self.samples_per_question >= 1,
                "--max-new-tokens and --samples-per-question must be >= 1")
        require(self.backend in ("auto", "hf", "vllm"), f"--backend {self.backend!r}: use auto, hf or vllm")
        require(self.policy_serving in ("lora", "merged"), f"--policy-serving {self.policy_serving!r}: lora or merged")
        require(self.max_num_seqs >= 0 and self.typical_new_tokens >= 0, "--max-num-seqs, --typical-new-tokens >= 0")
        require(self.from_step in STEPS and self.to_step in STEPS, f"--from/--to: choose from {', '.join(STEPS)}")
        require(STEPS.index(self.from_step) <= STEPS.index(self.to_step), "--from comes after --to")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def steps(self) -> list[str]:
        return list(STEPS[STEPS.index(self.from_step): STEPS.index(self.to_step) + 1])

    def shape_config(self) -> dict:
        from app.shapes import SHAPES

        return json.loads(Path(self.model_config).read_text()) if self.model_config else SHAPES[self.shape]

    def model_path(self) -> Path:
        if self.model_dir:
            return Path(self.model_dir)
        name = f"rehearse-model-{self.shape if not self.model_config else Path(self.model_config).stem}"
        return Path(self.store) / name if not artifacts.is_s3(self.store) else Path(name)

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.model_path().parent / "rehearse-compile-cache"

    def shards(self) -> int:
        """Eval runs shard 0 of this many: the share as a whole number of GPUs."""
        return max(1, round(1 / self.share))


# ---------------------------------------------------------------------------------------------
# The steps


def main(config: Config) -> dict:
    banner(f"rehearse  run={config.run_id}  store={config.store}  steps={' -> '.join(config.steps())}")
    log_config(config)
    artifacts.check_store(config.store)
    walls = _read_walls(config)
    for step in config.steps():
        if step == "report":
            continue
        banner(f"rehearse: {step}")
        started = time.time()
        if step == "model":
            if write_model(config):
                walls[step] = round(time.time() - started, 1)
        else:
            walls.update(run_phase(config, step))
        _write_walls(config, walls)
    if "report" not in config.steps():
        return {"walls": walls}
    result = report(config, walls)
    backend, prefix = artifacts.open_store(config.store)
    for name, data in (("rehearsal.md", result["markdown"]), ("rehearsal.json", json.dumps(result["data"], indent=2))):
        key = artifacts.join(prefix, "runs", config.run_id, name) if prefix else f"runs/{config.run_id}/{name}"
        backend.write_bytes(key, data.encode())
    banner("rehearsal")
    for line in result["markdown"].splitlines():
        log(line)
    return result


def write_model(config: Config) -> bool:
    """The random model and its tokenizer; False when one of this shape is already there."""
    from app.shapes import read_marker, write_random_model

    path, shape = config.model_path(), config.shape_config()
    marker = read_marker(path)
    if not config.force and marker and marker.get("shape") == shape and marker.get("fp32_bin") == config.fp32_bin \
            and marker.get("seed") == config.seed:
        log(f"rehearse: {path} already holds this model; nothing to do (--force to redo)")
        return False
    from app.data import load_problems

    problems, _ = load_problems(config.train_data, split="train", seed=config.seed)
    texts = [f"{p.question}\n{p.answer}" for p in problems]
    info = write_random_model(shape, path, texts, fp32_bin=config.fp32_bin, seed=config.seed, log=log)
    from app.shapes import MARKER

    (path / MARKER).write_text(json.dumps({**info, "seed": config.seed}, indent=2))
    return True


def phase_argv(config: Config, phase: str, shard: int = 0) -> list[str]:
    """The phase's command line: the reference preset, this model and data, this share."""
    n_train = _count(config.train_data, "train", config)
    common = ["--preset", "abel-7b", "--store", config.store, "--run-id", config.run_id,
              "--base-model", str(config.model_path()), "--seed", str(config.seed)]
    if config.force:
        common.append("--force")
    share_of_train = max(1, round(n_train * config.share))
    if phase == "sft":
        return ["sft", *common, "--train-data", config.train_data, "--train-limit", str(share_of_train),
                "--sft-epochs", str(REFERENCE["sft_epochs"])]
    if phase == "rollouts":
        return ["rollouts", *common, "--rollout-data", config.train_data, "--rollout-limit", str(share_of_train),
                "--samples-per-question", str(config.samples_per_question), "--max-new-tokens", str(config.max_new_tokens),
                "--chunk-size", str(share_of_train), "--backend", config.backend,
                "--policy-serving", config.policy_serving, "--max-num-seqs", str(config.max_num_seqs),
                "--request-seeds" if config.request_seeds else "--no-request-seeds"]
    if phase == "preferences":
        return ["preferences", *common, "--gold-anchored"]
    if phase == "dpo":
        return ["dpo", *common]
    if phase == "eval":
        return ["eval", *common, "--eval-data", config.eval_data, "--max-new-tokens", str(config.max_new_tokens),
                "--backend", config.backend, "--num-shards", str(config.shards()), "--shard-index", str(shard),
                *(["--platinum"] if config.platinum else [])]
    raise ValueError(phase)


def run_phase(config: Config, phase: str) -> dict[str, float]:
    """Run one phase as its own process (as its Job would); {name: wall seconds} of the processes
    that published something (none when it was already published); a warm check's second eval
    shard is "eval-warm"."""
    shards = [0, 1] if phase == "eval" and config.warm_check and config.shards() > 1 else [0]
    walls = {}
    for shard in shards:
        started = time.time()
        uri = _phase_output(config, phase, shard)
        before = artifacts.read_manifest(uri)
        argv = [sys.executable, "-m", "app", *phase_argv(config, phase, shard)]
        log("rehearse: " + " ".join(argv[1:]))
        code = subprocess.call(argv, env=_phase_env(config))
        if code != 0:
            error = PipelineError(f"rehearse: {phase} exited with code {code}; see its log above "
                                  f"(resume with --from {phase})")
            error.exit_code = code if code > 0 else EXIT_RETRYABLE
            raise error
        after = artifacts.read_manifest(uri)
        if after is not None and (before is None or artifacts.manifest_digest(before) != artifacts.manifest_digest(after)):
            walls[phase if shard == 0 else f"{phase}-warm"] = round(time.time() - started, 1)
    return walls


def _phase_env(config: Config) -> dict:
    env = dict(os.environ)
    cache = config.cache_path()
    for name, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                      ("TRITON_CACHE_DIR", "triton")):
        env.setdefault(name, str(cache / sub))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _phase_output(config: Config, phase: str, shard: int = 0) -> str:
    from app.shards import shard_uri

    uri = artifacts.phase_uri(config.store, config.run_id, phase)
    return shard_uri(uri, shard) if phase == "eval" and config.shards() > 1 else uri


def _count(spec: str, split: str, config: Config) -> int:
    from app.data import load_problems

    return len(load_problems(spec, split=split, seed=config.seed)[0])


def _read_walls(config: Config) -> dict:
    backend, prefix = artifacts.open_store(config.store)
    raw = backend.read_bytes(artifacts.join(prefix, "runs", config.run_id, WALLS) if prefix
                             else f"runs/{config.run_id}/{WALLS}")
    return json.loads(raw) if raw else {}


def _write_walls(config: Config, walls: dict) -> None:
    backend, prefix = artifacts.open_store(config.store)
    backend.write_bytes(artifacts.join(prefix, "runs", config.run_id, WALLS) if prefix
                        else f"runs/{config.run_id}/{WALLS}", json.dumps(walls, indent=2).encode())


# ---------------------------------------------------------------------------------------------
# The report and the projection


def typical_lengths(config: Config) -> dict:
    """Mean tokens of GSM8K's gold solutions (as SFT trains on them, with EOS) and of the direct prompt."""
    from app.data import load_problems
    from app.models import load_tokenizer
    from app.prompts import build_prompt, sft_target

    tokenizer = load_tokenizer(str(config.model_path()))
    problems, _ = load_problems(config.train_data, split="train", seed=config.seed)
    answers = tokenizer([sft_target(p.answer) for p in problems], add_special_tokens=False)["input_ids"]
    prompts = tokenizer([build_prompt(p.question, "direct", "abel") for p in problems])["input_ids"]
    measured = statistics.mean(len(ids) + 1 for ids in answers)
    return {"answer_tokens": round(config.typical_new_tokens or measured, 1), "answer_tokens_measured": round(measured, 1),
            "prompt_tokens": round(statistics.mean(len(ids) for ids in prompts), 1)}


def report(config: Config, walls: dict) -> dict:
    lengths = typical_lengths(config)
    rows, projection = [], {}
    model_marker = _model_info(config)
    if model_marker:
        rows.append({"phase": "model (rehearsal only)", "wall_s": walls.get("model"),
                     "load_s": None, "compile_s": None, "work_s": model_marker.get("write_s"),
                     "note": f"{model_marker.get('parameters', 0) / 1e9:.2f} B parameters, "
                             f"{model_marker.get('bytes', 0) / 1e9:.1f} GB written "
                             f"({'fp32 .bin' if model_marker.get('fp32_bin') else 'bf16 safetensors'})"})
    base = artifacts.read_manifest(artifacts.phase_uri(config.store, config.run_id, "base"))
    if base is not None and "convert_s" in base.get("metrics", {}):
        rows.append({"phase": "base: .bin -> bf16 safetensors", "work_s": base["metrics"]["convert_s"],
                     "note": "once per run, by the first phase; counted inside that phase's wall time"})
    for phase in PHASES:
        manifest = artifacts.read_manifest(_phase_output(config, phase))
        if manifest is None:
            rows.append({"phase": phase, "note": "not run"})
            continue
        timing = manifest.get("metrics", {}).get("timing", {})
        row = {"phase": phase, "wall_s": walls.get(phase, timing.get("total_s")), **{
            k: timing.get(k) for k in ("load_s", "compile_s", "work_s", "other_s", "total_s", "peak_gpu_mem_gib",
                                       "tokens_per_s", "merge_s")}}
        row["load_s"] = _plus(row.get("load_s"), row.pop("merge_s", None))
        row["note"], scale = _phase_note(config, phase, manifest, lengths)
        if phase != "preferences":  # a CPU step over all pairs: its time hardly depends on the share
            scale *= REFERENCE["share"] / config.share
        rows.append(row)
        projection[phase] = _projected(row, scale)
    if config.warm_check and config.shards() > 1:
        manifest = artifacts.read_manifest(_phase_output(config, "eval", 1))
        if manifest is not None:
            timing = manifest["metrics"].get("timing", {})
            rows.append({"phase": "eval, 2nd shard (warm caches)", "wall_s": walls.get("eval-warm"), **{
                k: timing.get(k) for k in (
                "load_s", "compile_s", "work_s", "other_s", "total_s", "peak_gpu_mem_gib", "tokens_per_s")},
                "note": "the same engine settings, started with the first shard's compile caches"})
    total = round(sum(projection.values()), 1)
    data = {"config": config.to_dict(), "reference": REFERENCE, "lengths": lengths, "rows": rows,
            "projection_s": projection, "projected_total_s": total}
    return {"markdown": render(config, data), "data": data}


def _model_info(config: Config) -> dict | None:
    from app.shapes import read_marker

    return read_marker(config.model_path())


def _plus(a, b):
    return a if b is None else (b if a is None else round(a + b, 2))


def _phase_note(config: Config, phase: str, manifest: dict, lengths: dict) -> tuple[str, float]:
    """(what the phase did, the factor that turns its measured work into the reference's at GSM8K lengths)."""
    metrics = manifest.get("metrics", {})
    timing = metrics.get("timing", {})
    answer = lengths["answer_tokens"]
    if phase == "sft":
        return f"{metrics.get('examples')} examples x {REFERENCE['sft_epochs']} epochs, {metrics.get('steps')} steps", 1.0
    if phase == "rollouts":
        mean = metrics.get("mean_tokens") or config.max_new_tokens
        scale = answer / mean
        return (f"{metrics.get('trajectories')} samples, mean {mean} new tokens ({metrics.get('truncated')} at the "
                f"limit), {timing.get('policy_serving')} policy; work x{scale:.2f} for {answer}-token answers"), scale
    if phase == "preferences":
        by_type = metrics.get("by_type", {})
        return (f"{metrics.get('pairs')} pairs: " + ", ".join(f"{n} {k}" for k, n in by_type.items() if n)), 1.0
    if phase == "dpo":
        pair = timing.get("mean_pair_tokens") or 1
        typical = lengths["prompt_tokens"] + 2 * answer
        scale = typical / pair
        return (f"{metrics.get('pairs')} pairs, {timing.get('pairs_per_s')} pairs/s, mean {pair} tokens a pair; "
                f"work x{scale:.2f} for {typical:.0f}-token pairs"), scale
    if phase == "eval":
        generation = manifest.get("timings", {}).get("generation", {})
        completions = generation.get("completions") or 1
        mean = (generation.get("tokens") or 0) / completions or config.max_new_tokens
        platinum = 1.0 if config.platinum else \
            (REFERENCE["test_questions"] + REFERENCE["platinum_questions"]) / REFERENCE["test_questions"]
        scale = answer / mean * platinum
        return (f"{completions} answers (3 models), mean {mean:.0f} new tokens; work x{scale:.2f} for "
                f"{answer}-token answers" + ("" if config.platinum else " and Platinum's 1,209 questions")), scale
    return "", 1.0


def _projected(row: dict, scale: float) -> float:
    """The phase's wall time in the reference: fixed costs as measured, work rescaled."""
    fixed = (row.get("wall_s") or 0) - (row.get("work_s") or 0)
    return round(fixed + (row.get("work_s") or 0) * scale, 1)


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def render(config: Config, data: dict) -> str:
    lengths = data["lengths"]
    lines = [f"# Rehearsal `{config.run_id}`: shape {config.shape}, share {config.share:g} of the reference", "",
             "Per phase: wall time of its process, split as the phase measured it (app/timing.py): model "
             "load, compile or engine start, work (training steps or generation), other (imports, data, "
             "scoring, publishing); peak GPU memory; tokens/s over the work. 'projected' is the phase in "
             f"the reference pipeline, one GPU's share of {REFERENCE['gpus']}: fixed costs as measured, "
             f"work rescaled to a share of {REFERENCE['share']:g} and to GSM8K-typical lengths.", "",
             "| phase | wall s | load s | compile / start s | work s | other s | peak GPU GiB | tokens/s | "
             "projected s | what |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        projected = data["projection_s"].get(row["phase"]) if row["phase"] in PHASES else None
        lines.append(f"| {row['phase']} | {_fmt(row.get('wall_s'))} | {_fmt(row.get('load_s'), 1)} | "
                     f"{_fmt(row.get('compile_s'), 1)} | {_fmt(row.get('work_s'), 1)} | {_fmt(row.get('other_s'), 1)} | "
                     f"{_fmt(row.get('peak_gpu_mem_gib'), 1)} | {_fmt(row.get('tokens_per_s'))} | "
                     f"{_fmt(projected)} | {row.get('note', '')} |")
    total = data["projected_total_s"]
    lines += ["", f"Projected reference pipeline on {REFERENCE['gpus']} GPUs: {total:,.0f} s ({total / 60:.1f} min), "
              f"from the measured parts above: fixed costs as measured, generation and DPO work rescaled to "
              f"GSM8K-typical lengths ({lengths['answer_tokens']} answer tokens, gold solutions measured with this "
              f"tokenizer: {lengths['answer_tokens_measured']}; prompts {lengths['prompt_tokens']} tokens). "
              "Left out: pod scheduling and image pulls, artifact transfers to and from S3, and the 8-GPU "
              "collectives (SFT's and DPO's gradient all-reduce).", ""]
    return "\n".join(lines)

