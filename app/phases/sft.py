"""Phase 1, SFT: LoRA fine-tune the base model on GSM8K train with tutoring-style prompts.

    python -m app sft                                                  # embedded demo: tiny model, CPU
    python -m app sft --preset abel-7b --store s3://bucket/gsm8k --run-id r1             # one GPU
    python -m app.launch --nproc-per-node 8 sft --preset abel-7b \\
        --store s3://bucket/gsm8k --run-id r1                                            # 8 GPUs

Reads `--train-data` (default for abel-7b: hf:openai/gsm8k, train split) and the base
model; writes `<store>/runs/<run-id>/sft/`: a PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`), the tokenizer, `base_model_shape.json`, `metrics.json`.

Choices:
- Prompt-completion data, loss on the completion only: the model is taught to answer,
  not to repeat the question. The completion is GSM8K's solution without calculator
  annotations, ending in `#### <number>` (what the answer extractor reads) and EOS.
- LoRA r=16 on every linear layer of the attention and MLP blocks; the base stays
  frozen in bf16, so the 7B model trains on one 80 GB GPU with no gradient checkpointing.
- TRL's SFTTrainer does the loop (DDP under torchrun); only rank 0 publishes. Its step is our
  fast path (`app.training.trainers.FastSFTTrainer`: packed rows, fused LoRA, chunked log-probs,
  compiled layers on GPU; the same loss, docs/PERFORMANCE.md).
- Every `--save-steps` steps a checkpoint (adapter, optimizer, scheduler, RNG states, step)
  goes to `<store>/runs/<run-id>/sft/checkpoints/`; a restarted Job resumes from the newest
  one of the same config (app/checkpoints.py, docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from app import artifacts, checkpoints, tracking
from app.config import RunConfig, option, require
from app.data import ACCEPT_UNMARKED_HELP, load_problems
from app.log import log
from app.models import gpu_bf16, load_causal_lm, load_tokenizer, lora_config, record_base_shape, resolve_base_model
from app.phases import begin
from app.prompts import build_prompt, sft_target
from app.timing import PhaseTimer, step_clock


@dataclass
class Config(RunConfig):
    train_data: str = option("synthetic:1200", "training problems: hf:openai/gsm8k, synthetic:N, or a JSONL path/URI",
                             location=True)
    train_limit: int = option(0, "use only the first N training problems (0 = all)")
    prompt_format: str = option("abel", "prompt format: abel, plain or chat")
    sft_epochs: float = option(2.0, "training epochs")
    sft_learning_rate: float = option(2e-4, "peak learning rate (cosine decay, 3% warm-up)")
    sft_batch_size: int = option(16, "sequences per device per step")
    sft_grad_accum: int = option(1, "gradient accumulation steps")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    max_seq_length: int = option(1024, "longest prompt+completion in tokens; longer rows are truncated")
    bf16: bool = option(True, "train in bf16 on GPUs (the CPU always uses fp32)")
    max_reject_rate: float = option(0.01, "fail if more than this share of training rows is unusable")
    accept_answer_without_marker: bool = option(False, ACCEPT_UNMARKED_HELP)
    save_steps: int = option(100, "publish a resumable checkpoint every N optimizer steps (0 = never)")

    def validate(self) -> None:
        super().validate()
        require(self.sft_epochs > 0, f"--sft-epochs must be > 0, got {self.sft_epochs}")
        require(0 < self.sft_learning_rate < 1, f"--sft-learning-rate must be in (0, 1), got {self.sft_learning_rate}")
        require(self.sft_batch_size >= 1 and self.sft_grad_accum >= 1, "--sft-batch-size and --sft-grad-accum must be >= 1")
        require(self.lora_r >= 1 and self.lora_alpha >= 1, "--lora-r and --lora-alpha must be >= 1")
        require(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.max_seq_length >= 16, f"--max-seq-length must be >= 16, got {self.max_seq_length}")
        require(self.train_limit >= 0, "--train-limit must be >= 0")
        require(0 <= self.max_reject_rate <= 1, "--max-reject-rate must be in [0, 1]")
        require(self.prompt_format in ("abel", "plain", "chat"), f"--prompt-format {self.prompt_format!r}: use abel, plain or chat")
        require(self.save_steps >= 0, f"--save-steps must be >= 0 (0 = no checkpoints), got {self.save_steps}")

    def identity(self) -> dict:
        values = super().identity()
        values.pop("save_steps")  # how often we checkpoint does not change what is trained
        return values


def main(config: Config) -> dict | None:
    out_uri = artifacts.phase_uri(config.store, config.run_id, "sft")
    if (published := begin("sft", out_uri, config)) is not None:
        return published

    started = time.time()
    timer = PhaseTimer()
    problems, report = load_problems(config.train_data, split="train", limit=config.train_limit or None,
                                     max_reject_rate=config.max_reject_rate, seed=config.seed,
                                     accept_unmarked=config.accept_answer_without_marker)
    log(f"data: {report.line()}; training on {len(problems)}")

    from accelerate import PartialState

    with PartialState().main_process_first():
        base_path, base_lineage = resolve_base_model(config.base_model, config.store, config.run_id, log=log,
                                                     publish_bf16=gpu_bf16(config.bf16))
    log(f"base model: {base_path}")

    config_hash = artifacts.config_hash(config.identity())
    resume = checkpoints.latest_checkpoint(out_uri, config_hash, log=log)
    resumed_step = checkpoints.checkpoint_info(resume)["step"] if resume else 0
    log(f"sft: resuming from {resume} (step {resumed_step})" if resume else
        "sft: no checkpoint to resume from; starting at step 0")
    tracker = tracking.open_run(config, "sft")  # before the Trainer, whose integrations log into this run
    clock = step_clock()
    trainer, tokenizer = build_trainer(config, base_path, problems, timer=timer,
                                       callbacks=[checkpoints.trainer_callback(out_uri, config_hash, log=log), clock])
    log(f"training: {len(problems)} examples x {config.sft_epochs} epochs, "
        f"batch {config.sft_batch_size} x accum {config.sft_grad_accum} x {trainer.args.world_size} processes")
    with timer.part("work"):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    timer.move("work", "compile", clock.compile_seconds())
    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "train_loss": round(result.training_loss, 4),
        "first_logged_loss": history[0]["loss"] if history else None,
        "last_logged_loss": history[-1]["loss"] if history else None,
        "steps": trainer.state.global_step,
        "examples": len(problems),
        "rejected_rows": report.rejected,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "resumed_from_step": resumed_step,
    }
    metrics["timing"] = timer.metrics(tokens=trained_tokens(trainer, config.max_seq_length, config.sft_epochs),
                                      steps=trainer.state.global_step)
    log("sft: timing " + json.dumps(metrics["timing"]))
    tracker.log_metrics(metrics, step=trainer.state.global_step)
    tracker.close()
    if not trainer.accelerator.is_main_process:
        return None

    with artifacts.workdir("sft") as work:
        trainer.model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        record_base_shape(work, trainer.model.get_base_model().config)
        (work / "metrics.json").write_text(json.dumps({**metrics, "loss_history": history}, indent=2))
        manifest = artifacts.publish(work, out_uri, phase="sft", config=config.to_dict(), identity=config.identity(),
                                     inputs={"base": base_lineage, "train_data": {"spec": config.train_data}},
                                     metrics=metrics, timings={"total_s": round(time.time() - started, 1)},
                                     overwrite=config.force)
    checkpoints.clear_checkpoints(out_uri, scratch=trainer.args.output_dir)  # the artifact is what counts now
    log(f"sft: loss {metrics['first_logged_loss']} -> {metrics['last_logged_loss']}; published {out_uri}")
    return manifest


def trained_tokens(trainer, max_length: int, epochs: float) -> int:
    """Tokens this process trains on over all epochs (rows cut at `max_length`), for tokens/s."""
    rows = trainer.train_dataset["input_ids"]
    return int(sum(min(len(ids), max_length) for ids in rows) * epochs)


def build_trainer(config: Config, base_path: str, problems, callbacks=None, timer=None):
    """TRL SFTTrainer over prompt-completion pairs, LoRA on all linear layers; `timer` (app.timing)
    counts the model's loading as its "load" part."""
    import contextlib

    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from app.training.overrides import host_arguments
    from app.training.trainers import FastSFTTrainer

    with timer.part("load") if timer else contextlib.nullcontext():
        tokenizer = load_tokenizer(base_path)
        model = load_causal_lm(base_path, bf16=config.bf16)
    rows = [{"prompt": build_prompt(p.question, "direct", config.prompt_format, tokenizer),
             "completion": sft_target(p.answer)} for p in problems]
    dataset = Dataset.from_list(rows)
    on_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(artifacts.trainer_dir("sft", config.run_id)),
        num_train_epochs=config.sft_epochs,
        # Batch x accumulation as one micro-batch: the same examples per optimizer step (the sampler's
        # order does not depend on the batch size), the same token-mean loss, fewer and larger steps.
        per_device_train_batch_size=config.sft_batch_size * config.sft_grad_accum,
        gradient_accumulation_steps=1,
        learning_rate=config.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        logging_steps=1 if len(rows) < 5000 else 10,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,  # (unused when save_strategy is "no")
        save_total_limit=1,  # local copies only; the store keeps the last two (app/checkpoints.py)
        **tracking.trainer_settings(config, "sft"),  # report_to and run_name
        bf16=config.bf16 and on_gpu,
        use_cpu=not on_gpu,
        max_length=config.max_seq_length,
        completion_only_loss=True,
        gradient_checkpointing=False,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=2 if on_gpu else 0,
        disable_tqdm=False,
        logging_first_step=True,
        **host_arguments(),  # the host never waits for the GPU inside a step (app/training/overrides.py)
    )
    trainer = FastSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora_config(config.lora_r, config.lora_alpha, config.lora_dropout),
                             callbacks=callbacks)
    return trainer, tokenizer

