"""Phase 4, DPO: train the SFT policy on the preference pairs.

    python -m app dpo                                                  # embedded demo
    python -m app.launch --nproc-per-node 8 dpo --preset abel-7b \\
        --store s3://bucket/gsm8k --run-id r1                          # reference case, 8 GPUs

Policy = base + SFT LoRA, trainable. Reference = base + the same SFT LoRA, frozen
(`--round r` >= 2: both start as round r-1's DPO adapter, the latest policy, on round r's pairs):
TRL copies the loaded adapter into a second, frozen adapter named `ref` inside the one
model, so there is no second 7B copy in memory and the reference is the SFT model, not
the pre-SFT base. Because policy and reference start identical, the first step's loss
must be ln 2 = 0.6931 and every reward margin 0; `main` checks this on the logged
first step and fails loudly if it is not so (a wrong reference would show here first).

Reference-case defaults (`--preset abel-7b`): per-device batch 2, grad accum 2,
lr 5e-6, beta 0.1, bf16, 1 epoch, and an NLL term of weight 1 on the chosen answer
(`--dpo-recipe rpo`, Pang et al. 2024); `--dpo-recipe reference` is plain DPO. Output `<store>/runs/<run-id>/dpo/`: the adapter
(only the trained `default` adapter, not the frozen copy), tokenizer, metrics.json.
Every `--save-steps` steps a checkpoint goes to `<store>/runs/<run-id>/dpo/checkpoints/`;
a restarted Job resumes from the newest one of the same config (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from app import artifacts, checkpoints, tracking
from app.config import RunConfig, option, require
from app.data import read_jsonl
from app.errors import InputError
from app.log import log
from app.models import (check_adapter_matches, gpu_bf16, load_causal_lm, load_tokenizer, record_base_shape,
                        resolve_base_model)
from app.phases import ROUND_HELP, begin, policy_input, policy_uri
from app.phases.preferences import PAIR_TYPES
from app.presets import DPO_RECIPES
from app.timing import PhaseTimer, step_clock

LN2 = math.log(2)


@dataclass
class Config(RunConfig):
    dpo_epochs: float = option(1.0, "training epochs over the pairs")
    round: int = option(1, ROUND_HELP)
    dpo_learning_rate: float = option(5e-6, "peak learning rate")
    dpo_batch_size: int = option(2, "pairs per device per step")
    dpo_grad_accum: int = option(2, "gradient accumulation steps")
    dpo_beta: float = option(0.1, "DPO beta: how far the policy may move from the reference")
    dpo_sft_weight: float = option(0.0, "weight of an NLL loss on the chosen answer added to the DPO loss "
                                   "(RPO, Pang et al. 2024: keeps DPO from lowering the likelihood of correct "
                                   "solutions; TRL's former rpo_alpha; 0 = pure DPO)", aliases=("--dpo-rpo-alpha",))
    dpo_recipe: str = option("", "a bundle of DPO settings over the preset's: 'rpo' (DPO + NLL weight 1 on the "
                             "chosen answer) or 'reference' (plain DPO, lr 5e-6, batch 2 x 2 per GPU, beta 0.1); "
                             "flags still win; '' = the preset's settings as they are")
    max_seq_length: int = option(1024, "longest prompt+completion in tokens")
    bf16: bool = option(True, "train in bf16 on GPUs (the CPU always uses fp32)")
    pair_types: list[str] = option(["correctness", "quality", "gold_anchored"],
                                   "which pair types to train on, comma-separated (gold_anchored pairs exist only "
                                   "when preferences ran with --gold-anchored)")
    check_step0: bool = option(True, "fail unless the first step's loss is ln 2 and its margins 0")
    save_steps: int = option(100, "publish a resumable checkpoint every N optimizer steps (0 = never)")

    def validate(self) -> None:
        super().validate()
        require(self.dpo_epochs > 0, "--dpo-epochs must be > 0")
        require(self.round >= 1, f"--round must be >= 1, got {self.round}")
        require(0 < self.dpo_learning_rate < 1, f"--dpo-learning-rate must be in (0, 1), got {self.dpo_learning_rate}")
        require(self.dpo_batch_size >= 1 and self.dpo_grad_accum >= 1, "--dpo-batch-size and --dpo-grad-accum must be >= 1")
        require(self.dpo_beta > 0, f"--dpo-beta must be > 0, got {self.dpo_beta}")
        require(self.dpo_sft_weight >= 0, f"--dpo-sft-weight must be >= 0, got {self.dpo_sft_weight}")
        require(self.dpo_recipe in ("", *DPO_RECIPES), f"--dpo-recipe {self.dpo_recipe!r}: use {' or '.join(DPO_RECIPES)}")
        require(self.max_seq_length >= 16, "--max-seq-length must be >= 16")
        bad = [t for t in self.pair_types if t not in PAIR_TYPES]
        require(not bad and bool(self.pair_types), f"--pair-types {self.pair_types}: choose from {', '.join(PAIR_TYPES)}")
        require(self.save_steps >= 0, f"--save-steps must be >= 0 (0 = no checkpoints), got {self.save_steps}")

    def identity(self) -> dict:
        values = super().identity()
        values.pop("save_steps")  # how often we checkpoint does not change what is trained
        return values


def main(config: Config) -> dict | None:
    out_uri = artifacts.phase_uri(config.store, config.run_id, "dpo", config.round)
    if (published := begin("dpo", out_uri, config)) is not None:
        return published
    started = time.time()
    timer = PhaseTimer()
    prefs_uri = artifacts.phase_uri(config.store, config.run_id, "preferences", config.round)
    start_uri = policy_uri(config.store, config.run_id, config.round)  # round r >= 2: round r-1's DPO adapter
    prefs_dir, prefs_manifest = artifacts.fetch(prefs_uri)
    pairs = read_pairs(prefs_dir / "preferences.jsonl", config.pair_types)
    start_dir, start_manifest = artifacts.fetch(start_uri)
    kinds = [p.pop("type") for p in pairs]  # the trainer's rows: prompt, chosen, rejected
    by_type = {kind: kinds.count(kind) for kind in config.pair_types}
    log(f"pairs: {len(pairs)} ({', '.join(f'{n} {kind}' for kind, n in by_type.items())})")

    from accelerate import PartialState

    with PartialState().main_process_first():
        base_path, base_lineage = resolve_base_model(config.base_model, config.store, config.run_id, log=log,
                                                     publish_bf16=gpu_bf16(config.bf16))
    config_hash = artifacts.config_hash(config.identity())
    resume = checkpoints.latest_checkpoint(out_uri, config_hash, log=log)
    resumed_step = checkpoints.checkpoint_info(resume)["step"] if resume else 0
    log(f"dpo: resuming from {resume} (step {resumed_step})" if resume else
        "dpo: no checkpoint to resume from; starting at step 0")
    tracker = tracking.open_run(config, "dpo")  # before the Trainer, whose integrations log into this run
    clock = step_clock()
    trainer, tokenizer = build_trainer(config, base_path, str(start_dir), pairs, timer=timer,
                                       callbacks=[checkpoints.trainer_callback(out_uri, config_hash, log=log), clock])
    if resume:
        checkpoints.restore_trained_adapter(trainer.model, resume)  # the Trainer's resume loads only `ref`
    with timer.part("work"):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    timer.move("work", "compile", clock.compile_seconds())
    history = [h for h in trainer.state.log_history if "loss" in h]
    step0 = history[0] if history else {}
    metrics = {
        "pairs": len(pairs),
        "pairs_by_type": by_type,
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "step0_loss": step0.get("loss"),
        "step0_margin": step0.get("rewards/margins"),
        "last_loss": history[-1].get("loss") if history else None,
        "last_margin": history[-1].get("rewards/margins") if history else None,
        "last_accuracy": history[-1].get("rewards/accuracies") if history else None,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "resumed_from_step": resumed_step,
    }
    tokens = pair_tokens(trainer, config.max_seq_length)
    metrics["timing"] = timer.metrics(tokens=int(tokens * config.dpo_epochs), steps=trainer.state.global_step,
                                      mean_pair_tokens=round(tokens / max(1, len(pairs)), 1))
    work = metrics["timing"]["work_s"]
    metrics["timing"]["pairs_per_s"] = round(len(pairs) * config.dpo_epochs / work, 2) if work else None
    log("dpo: timing " + json.dumps(metrics["timing"]))
    log(f"dpo: step-0 loss {metrics['step0_loss']} (ln 2 = {LN2:.4f}), margin {metrics['step0_margin']}; "
        f"last loss {metrics['last_loss']}, margin {metrics['last_margin']}, accuracy {metrics['last_accuracy']}")
    tracker.log_metrics(metrics, step=trainer.state.global_step)
    if config.check_step0:
        check_step0(step0, pure_dpo=config.dpo_sft_weight == 0)
    tracker.close()
    if not trainer.accelerator.is_main_process:
        return None

    with artifacts.workdir("dpo") as work:
        trainer.model.save_pretrained(work, selected_adapters=["default"])
        tokenizer.save_pretrained(work)
        record_base_shape(work, trainer.model.get_base_model().config)
        (work / "metrics.json").write_text(json.dumps({**metrics, "loss_history": history}, indent=2))
        manifest = artifacts.publish(
            work, out_uri, phase="dpo", config=config.to_dict(), identity=config.identity(),
            inputs={"preferences": artifacts.lineage_entry(prefs_uri, prefs_manifest),
                    policy_input(config.round): artifacts.lineage_entry(start_uri, start_manifest), "base": base_lineage},
            metrics=metrics, timings={"total_s": round(time.time() - started, 1)}, overwrite=config.force)
    checkpoints.clear_checkpoints(out_uri, scratch=trainer.args.output_dir)  # the artifact is what counts now
    log(f"dpo: published {out_uri}")
    return manifest


def check_step0(step0: dict, pure_dpo: bool = True, tolerance: float = 0.02) -> None:
    """Policy and reference are the same model at step 0: every implicit reward and margin is 0,
    so the DPO term is exactly -log sigmoid(0) = ln 2 (plus the NLL term when --dpo-sft-weight > 0)."""
    loss, margin, chosen = step0.get("loss"), step0.get("rewards/margins"), step0.get("rewards/chosen")
    if loss is None or margin is None:
        raise RuntimeError("dpo: the first step was not logged; cannot verify the reference model")
    rewards_zero = abs(margin) <= tolerance and (chosen is None or abs(chosen) <= tolerance)
    if not rewards_zero or (pure_dpo and abs(loss - LN2) > tolerance):
        raise RuntimeError(f"dpo: step-0 loss {loss:.4f} / margin {margin:.4f}, expected {LN2:.4f} / 0: the reference "
                           "model is not the SFT policy")


def read_pairs(path, pair_types: list[str]) -> list[dict]:
    pairs = []
    for line_number, row in read_jsonl(path):
        for field in ("prompt", "chosen", "rejected", "type"):
            if not isinstance(row.get(field), str):
                raise InputError(f"{path}:{line_number}: field '{field}' missing or not a string")
        if row["chosen"] == row["rejected"]:
            raise InputError(f"{path}:{line_number}: chosen and rejected are the same text")
        if row["type"] in pair_types:
            pairs.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                          "type": row["type"]})
    if not pairs:
        raise InputError(f"{path}: no preference pairs of types {pair_types}; nothing to train on")
    return pairs


def pair_tokens(trainer, max_length: int) -> int:
    """Tokens of all pairs, each counted once: prompt + chosen + rejected (rows cut at `max_length`)."""
    data = trainer.train_dataset
    total = 0
    for prompt, chosen, rejected in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]):
        total += min(len(prompt) + len(chosen), max_length) + min(len(prompt) + len(rejected), max_length) - len(prompt)
    return total


def build_trainer(config: Config, base_path: str, sft_dir: str, pairs: list[dict], callbacks=None, timer=None):
    """TRL DPOTrainer on the SFT PeftModel; TRL adds the frozen `ref` copy of its adapter. `timer`
    (app.timing) counts the model's and adapter's loading as its "load" part."""
    import contextlib

    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoConfig
    from trl import DPOConfig

    from app.training.overrides import host_arguments
    from app.training.trainers import FastDPOTrainer, dpo_loss_arguments  # TRL's trainer, our step (docs/PERFORMANCE.md)

    check_adapter_matches(sft_dir, AutoConfig.from_pretrained(base_path), "sft adapter")
    with timer.part("load") if timer else contextlib.nullcontext():
        tokenizer = load_tokenizer(base_path)
        base = load_causal_lm(base_path, bf16=config.bf16)
        model = PeftModel.from_pretrained(base, sft_dir, is_trainable=True)
    on_gpu = torch.cuda.is_available()
    # Batch x accumulation as one micro-batch (the same pairs per optimizer step, the loss averaged over
    # them), which also lets the step replay as a CUDA graph. TRL takes the NLL term's token mean per
    # micro-batch: the trainer takes it per group of --dpo-batch-size pairs, so the loss stays TRL's.
    args = DPOConfig(
        output_dir=str(artifacts.trainer_dir("dpo", config.run_id)),
        num_train_epochs=config.dpo_epochs,
        per_device_train_batch_size=config.dpo_batch_size * config.dpo_grad_accum,
        gradient_accumulation_steps=1,
        learning_rate=config.dpo_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        beta=config.dpo_beta,
        **dpo_loss_arguments(config.dpo_sft_weight),
        max_length=config.max_seq_length,
        # The first step is always logged (the reference check reads it); after that every 10th on
        # real data: each log makes the host wait for the GPU.
        logging_steps=1 if len(pairs) < 2000 else 10,
        logging_first_step=True,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,  # (unused when save_strategy is "no")
        save_total_limit=1,  # local copies only; the store keeps the last two (app/checkpoints.py)
        **tracking.trainer_settings(config, "dpo"),  # report_to and run_name
        bf16=config.bf16 and on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=2 if on_gpu else 0,
        **host_arguments(),  # the host never waits for the GPU inside a step (app/training/overrides.py)
    )

    trainer = FastDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tokenizer, callbacks=callbacks, nll_group_pairs=config.dpo_batch_size)
    return trainer, tokenizer
