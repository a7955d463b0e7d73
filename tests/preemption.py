"""Run a phase through the real CLI, record what each training step trained on, and die like a
preempted pod right after a given checkpoint has been published.

    python tests/preemption.py <record.jsonl> <kill after checkpoint step, or 0> <phase> [--flags...]

The phase, its trainer and app/checkpoints.py are the real ones; this only wraps them:
- (sft, dpo) the trainer's `training_step` appends {"step", "rows"} to `record.jsonl` for
  every micro-batch, where `rows` are SHA-256 fingerprints of each sequence's unpadded
  token ids: exactly the data the step trained on, recorded when it trains (not when the
  data loader prefetches it);
- `checkpoints.save_checkpoint` is followed, once it has returned for a step >= the kill
  step (the checkpoint and the pointer are in the store), by `os._exit(137)`: no cleanup,
  no exception handlers, the exit code Kubernetes reports for SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

KILLED_EXIT_CODE = 137


def fingerprint_rows(inputs: dict) -> list[str]:
    """One fingerprint per training sequence, from a padded batch or a packed row (the fast trainers')."""
    from app.training.packing import unpack_batch

    inputs = unpack_batch(inputs)
    if "packed_cu_seqlens" in inputs:
        flat, bounds = inputs["input_ids"].reshape(-1).tolist(), inputs["packed_cu_seqlens"].tolist()
        rows = [flat[start:end] for start, end in zip(bounds, bounds[1:])]
    else:
        rows = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    return [hashlib.sha256(str(row).encode()).hexdigest()[:16] for row in rows]


def instrument(trainer, record: Path):
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        with open(record, "a") as handle:
            handle.write(json.dumps({"step": trainer.state.global_step + 1, "rows": fingerprint_rows(inputs)}) + "\n")
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    return trainer


def patch_phase(phase: str, record: Path):
    """Make `app.phases.<phase>.build_trainer` return recording trainers; returns an undo function."""
    import importlib

    module = importlib.import_module(f"app.phases.{phase}")
    original = module.build_trainer

    def build_trainer(*args, **kwargs):
        trainer, tokenizer = original(*args, **kwargs)
        return instrument(trainer, record), tokenizer

    module.build_trainer = build_trainer
    return lambda: setattr(module, "build_trainer", original)


def die_after_checkpoint(step: int) -> None:
    from app import checkpoints

    original = checkpoints.save_checkpoint

    def save_checkpoint(phase_uri, at_step, *args, **kwargs):
        manifest = original(phase_uri, at_step, *args, **kwargs)
        if at_step >= step:
            print(f"preemption: killed right after checkpoint {at_step} was published", flush=True)
            os._exit(KILLED_EXIT_CODE)
        return manifest

    checkpoints.save_checkpoint = save_checkpoint


def read_record(record: Path) -> list[dict]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    record_path, kill_step, phase_name, *flags = sys.argv[1:]
    if phase_name in ("sft", "dpo"):
        patch_phase(phase_name, Path(record_path))
    if int(kill_step):
        die_after_checkpoint(int(kill_step))
    from app.cli import main

    sys.exit(main([phase_name, *flags]))
