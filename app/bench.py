"""Benchmark: our training and generation paths against the peer (TRL / HF defaults), in one run.

    python -m app bench sft                       # Mistral-7B shape, random bf16 weights, one GPU
    python -m app bench all --out bench.json      # sft, dpo and generate; results also as JSON
    python -m app bench sft --shape tiny          # a 2-layer model: checks the bench runs (CPU ok)
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
  generate  ours: `app.generation`'s backend (vLLM where installed, else its HF path);
            peer: HF `generate`, batch 64, sampling.

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
import math
import random
import time
from dataclasses import dataclass

from app.config import option, require

POSITIONAL = "phase"  # `python -m app bench sft` == `python -m app bench --phase sft`
PHASES = ("sft", "dpo", "generate")

SHAPES = {
    # hidden, layers, heads, kv heads, MLP, vocab
    "mistral-7b": (4096, 32, 32, 8, 14336, 32000),
    "tiny": (64, 2, 4, 2, 128, 512),
}

# 128 (question, answer) character lengths drawn at random (seed 0) from GSM8K's train split.
# Lengths only; the text is not needed to time anything.
GSM8K_CHAR_LENGTHS = [
    (227, 235), (427, 460), (408, 268), (363, 250), (541, 530), (525, 410), (432, 342), (279, 154), (247, 285),
    (239, 225), (458, 481), (182, 191), (298, 249), (356, 376), (183, 280), (199, 460), (472, 614), (145, 257),
    (280, 207), (203, 756), (146, 325), (308, 348), (232, 203), (169, 125), (149, 171), (362, 354), (214, 263),
    (203, 285), (370, 424), (231, 207), (310, 242), (139, 277), (235, 300), (88, 302), (148, 104), (180, 256),
    (142, 205), (298, 209), (366, 381), (208, 307), (127, 230), (202, 180), (121, 177), (249, 262), (88, 181),
    (256, 392), (463, 494), (250, 247), (451, 352), (193, 154), (240, 285), (121, 262), (262, 235), (169, 286),
    (380, 367), (104, 185), (201, 350), (164, 306), (161, 166), (154, 137), (397, 553), (223, 126), (255, 238),
    (184, 148), (255, 190), (302, 121), (211, 167), (326, 612), (240, 203), (322, 513), (245, 215), (232, 832),
    (262, 163), (190, 270), (214, 296), (562, 298), (225, 256), (128, 138), (156, 229), (116, 119), (229, 107),
    (306, 326), (398, 705), (260, 229), (111, 205), (153, 398), (123, 220), (194, 250), (102, 137), (155, 147),
    (436, 466), (237, 327), (168, 121), (285, 457), (305, 329), (249, 65), (160, 334), (264, 181), (353, 363),
    (199, 194), (302, 303), (180, 287), (220, 284), (85, 205), (210, 99), (237, 373), (374, 268), (147, 214),
    (282, 292), (198, 275), (295, 217), (248, 265), (178, 161), (448, 544), (115, 268), (143, 104), (333, 309),
    (175, 321), (352, 244), (414, 510), (254, 711), (211, 298), (243, 228), (309, 649), (179, 229), (194, 213),
    (374, 307), (249, 244),
]
# Token lengths as measured on GSM8K with the Abel prompt and Mistral's tokenizer (/work/shared/BASELINES.md):
# prompt ~110 = ~40 tokens of instruction and template + the question; completion ~130; rejected ~150.
PROMPT_FIXED, PROMPT_PER_CHAR, COMPLETION_PER_CHAR, REJECTED_FACTOR = 40, 70 / 234.5, 130 / 287.5, 150 / 130


@dataclass
class Config:
    phase: str = option("all", "what to run: sft, dpo, generate or all")
    shape: str = option("mistral-7b", "model shape: mistral-7b or tiny (a 2-layer model for smoke tests)")
    hidden_size: int = option(0, "override the shape's hidden size (0 = the shape's)")
    num_layers: int = option(0, "override the shape's number of layers (0 = the shape's)")
    vocab_size: int = option(0, "override the shape's vocabulary size (0 = the shape's)")
    steps: int = option(10, "timed optimizer steps of our path, after the warm-up steps")
    warmup_steps: int = option(3, "untimed optimizer steps first (allocator, kernels, compilation)")
    peer: bool = option(True, "also time the peer (TRL's trainers at their defaults, HF generate)")
    peer_steps: int = option(6, "timed optimizer steps of the peer, after one untimed step")
    check: bool = option(True, "check the fast path's loss and gradients against the plain path first")
    examples: int = option(1024, "synthetic examples (SFT) or pairs (DPO) to draw batches from")
    lengths: str = option("", "a GSM8K JSONL (question, answer) to take lengths from; default: the built-in sample")
    sft_batch_size: int = option(16, "ours: sequences per device per step (the abel-7b preset's)")
    sft_grad_accum: int = option(1, "ours: gradient accumulation steps")
    dpo_batch_size: int = option(2, "ours: pairs per device per micro-step (the abel-7b preset's)")
    dpo_grad_accum: int = option(2, "ours: gradient accumulation steps")
    max_tokens: int = option(8192, "ours: tokens per packed row (memory only; the update does not depend on it)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout (SFT; DPO turns dropout off, as TRL does)")
    compile: bool = option(True, "ours: torch.compile each decoder layer (on CUDA; as the phases do)")
    precompute_reference: bool = option(False, "ours, DPO: reference log-probs precomputed in large rows "
                                        "(faster; step 0 matches ln 2 only to bf16 rounding) instead of the "
                                        "frozen adapter on the same row")
    dpo_graphs: bool = option(True, "ours, DPO: replay each step's forward and backward as a CUDA graph (on CUDA; "
                              "rows padded to a multiple of --graph-pad-multiple tokens)")
    graph_pad_multiple: int = option(128, "ours, DPO with graphs: pad each packed row to a multiple of this")
    dpo_share_prompt: bool = option(True, "ours, DPO: compute each pair's prompt once for both completions")
    gen_prompts: int = option(256, "generate: prompts")
    gen_new_tokens: int = option(128, "generate: new tokens per prompt (random weights rarely stop early)")
    gen_batch_size: int = option(256, "generate: our backend's batch size (the abel-7b preset's question batch)")
    gen_static_cache: bool = option(True, "generate: also time our backend with a static KV cache and the decoding "
                                    "step compiled into CUDA graphs (on CUDA, with --compile)")
    peer_gen_batch_size: int = option(64, "generate: HF generate's batch size for the peer")
    profile_steps: int = option(0, "after the timed steps, this many more under torch.profiler: GPU busy share, "
                                "host syncs, top kernels and host ops (in the log and the JSON)")
    profile_peer: bool = option(False, "also profile the peer's steps (with --profile-steps)")
    trace_dir: str = option("", "with --profile-steps, also write Chrome traces (<phase>.json) to this directory")
    seed: int = option(0, "seed for weights and data")
    out: str = option("", "also write the results as JSON to this path")

    def validate(self) -> None:
        require(self.phase in PHASES + ("all",), f"bench phase {self.phase!r}: choose sft, dpo, generate or all")
        require(self.shape in SHAPES, f"--shape {self.shape!r}: choose from {', '.join(SHAPES)}")
        require(self.steps >= 1 and self.warmup_steps >= 1, "--steps and --warmup-steps must be >= 1")
        require(self.peer_steps >= 1, "--peer-steps must be >= 1")
        require(self.examples >= 8, "--examples must be >= 8")
        require(0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data


def model_config(config: Config):
    from transformers import MistralConfig

    hidden, layers, heads, kv_heads, mlp, vocab = SHAPES[config.shape]
    hidden = config.hidden_size or hidden
    return MistralConfig(hidden_size=hidden, num_hidden_layers=config.num_layers or layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=mlp if not config.hidden_size else int(hidden * 3.5),
                         vocab_size=config.vocab_size or vocab, max_position_embeddings=4096, sliding_window=None,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
                         attn_implementation="sdpa")


def build_model(config: Config, device):
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = MistralForCausalLM._from_config(model_config(config), dtype=dtype)
    model.config.use_cache = False
    return model


def word_tokenizer(vocab_size: int):
    """One whitespace-separated word `w<id>` = one token `<id>`: exact, controllable lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def token_lengths(config: Config, n: int) -> list[tuple[int, int, int]]:
    """(prompt, completion, rejected) token lengths of `n` GSM8K-like examples."""
    chars = GSM8K_CHAR_LENGTHS
    if config.lengths:
        from app.data import read_jsonl

        chars = [(len(row["question"]), len(row["answer"])) for _, row in read_jsonl(config.lengths)]
    rng = random.Random(config.seed)
    out = []
    for _ in range(n):
        q, a = rng.choice(chars)
        completion = max(4, round(a * COMPLETION_PER_CHAR))
        rejected = max(4, round(completion * REJECTED_FACTOR * rng.uniform(0.8, 1.2)))
        out.append((PROMPT_FIXED + round(q * PROMPT_PER_CHAR), completion, rejected))
    return out


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))


def texts(config: Config, vocab: int) -> list[dict]:
    """Prompt / completion / rejected texts; the prompt's BOS and the completions' EOS count in the lengths."""
    rng = random.Random(config.seed + 1)
    rows = []
    for prompt, completion, rejected in token_lengths(config, config.examples):
        rows.append({"prompt": _words(rng, prompt - 1, vocab),
                     "completion": " " + _words(rng, completion - 1, vocab),
                     "rejected": " " + _words(rng, rejected - 1, vocab)})
    return rows


# ---------------------------------------------------------------------------------------------
# Measuring


class Timer:
    """Wall time of optimizer steps warmup+1 .. last, with the device drained at both ends."""

    def __init__(self, warmup: int, device):
        self.warmup, self.device = warmup, device
        self.start = self.end = None

    def sync(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, step: int) -> None:
        if step == self.warmup:
            self.start = self.sync()
        self.end_step = step

    def stop(self) -> float:
        self.end = self.sync()
        return self.end - self.start


def reset_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None


def device_name(device) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def lora_model(base, config: Config, dropout: float):
    from peft import get_peft_model

    from app.models import lora_config

    return get_peft_model(base, lora_config(config.lora_r, config.lora_alpha, dropout))


def lora_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _restore_base(peft_model):
    """The base model back, without adapters, hooks or checkpointing, for the next run."""
    base = peft_model.unload() if hasattr(peft_model, "unload") else peft_model
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    if hasattr(base, "disable_input_require_grads"):
        try:
            base.disable_input_require_grads()
        except AttributeError:
            pass
    for p in base.parameters():
        p.requires_grad_(False)
        p.grad = None
    base.config.use_cache = False
    return base


def _row(phase: str, who: str, device, **values) -> dict:
    from app.training.distributed import world

    return {"phase": phase, "who": who, "device": device_name(device), "world_size": world()[1], **values}


def across_ranks(count: float, seconds: float, device) -> tuple[float, float]:
    """(`count` summed over ranks, the slowest rank's `seconds`): a global rate is their ratio.

    Each rank's Timer drained its own device; the slowest rank is the one the others wait for at
    DDP's gradient all-reduce, so its time is the run's. One process: the arguments unchanged.
    """
    from app.training.distributed import world

    size = world()[1]
    if size == 1:
        return count, seconds
    import torch
    import torch.distributed as dist

    mine = torch.tensor([float(count), float(seconds)], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()
    return float(every[:, 0].sum()), float(every[:, 1].max())


# ---------------------------------------------------------------------------------------------
# Timing a TRL-style trainer (ours and the peer go through the same harness)


def time_trainer(trainer, device, warm: int, timed: int, profile_steps: int = 0, trace_path: str = "") -> dict:
    """Train (max_steps = warm + timed + profile_steps) and time steps warm+1 .. warm+timed, counting real tokens.

    Ours count in `compute_loss` (their loader may run in worker processes); the peer's collator
    is wrapped (its loader runs in this process, TRL's default). With `profile_steps`, that many
    more steps run under torch.profiler after the timed ones (the timing never includes it).
    Data-parallel, each rank counts its own batches; `tokens` and `seconds` come back global
    (`across_ranks`), `peak_gib` is this rank's.
    """
    from transformers import TrainerCallback

    from app.training.distributed import is_main
    from app.training.profiling import StepProfiler, format_summary

    counter = {"tokens": 0, "at_start": 0, "at_end": None}
    timer = Timer(warm, device)
    own_count = hasattr(trainer, "tokens_seen")

    def seen() -> int:
        return trainer.tokens_seen if own_count else counter["tokens"]

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())  # host time, no sync: shows outliers (recompiles, recordings)
            timer(state.global_step)
            if state.global_step == warm:
                counter["at_start"] = seen()
            elif state.global_step == warm + timed:
                timer.stop()
                counter["at_end"] = seen()

    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        counter["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    if not own_count:
        trainer.data_collator = counting
    trainer.add_callback(Clock())
    profiler = StepProfiler(warm + timed, profile_steps, device, trace_path)
    if profile_steps:
        trainer.add_callback(profiler.callback())
    reset_memory(device)
    trainer.train()
    if counter["at_end"] is None:  # fewer steps than asked (a tiny dataset): time what ran
        timer.stop()
        counter["at_end"] = seen()
    steps = min(trainer.state.global_step, warm + timed) - warm
    # The loader may run one micro-batch ahead of the optimizer; over the timed steps that is noise.
    tokens, seconds = across_ranks(counter["at_end"] - counter["at_start"], timer.end - timer.start, device)
    run = {"seconds": seconds, "steps": steps, "tokens": round(tokens),
           "peak_gib": peak_gib(device), "log": [h for h in trainer.state.log_history if "loss" in h],
           "step_ms": [round(1e3 * (b - a)) for a, b in zip(step_ends, step_ends[1:])]}
    if profiler.summary is not None:
        run["profile"] = profiler.summary
        if is_main():
            print(format_summary(profiler.summary), flush=True)
    return run


def _our_steps(config: Config) -> int:
    return config.warmup_steps + config.steps + config.profile_steps


def _peer_profile_steps(config: Config) -> int:
    return config.profile_steps if config.profile_peer else 0


def _peer_steps(config: Config) -> int:
    return 1 + config.peer_steps + _peer_profile_steps(config)


def _compiled(config: Config) -> str:
    return ", compiled" if config.compile else ""


def _profile(run: dict) -> dict:
    return {"profile": run["profile"]} if "profile" in run else {}


def _trace(config: Config, name: str) -> str:
    if not (config.trace_dir and config.profile_steps):
        return ""
    import os

    os.makedirs(config.trace_dir, exist_ok=True)
    return os.path.join(config.trace_dir, f"{name}.json")


def _common_args(config: Config, device, prefix: str, workers: int = 0) -> dict:
    import tempfile

    return dict(output_dir=tempfile.mkdtemp(prefix=prefix), report_to="none", save_strategy="no",
                bf16=device.type == "cuda", use_cpu=device.type != "cuda", disable_tqdm=True, seed=config.seed,
                dataloader_num_workers=workers)


def _guard(fn, phase, device, log, *args) -> dict:
    """Run a peer; if it breaks (a missing package, an incompatible version), say so in its row."""
    try:
        return fn(*args)
    except Exception as exc:
        log(f"{phase} peer failed: {type(exc).__name__}: {exc}")
        return _row(phase, "peer", device, error=f"{type(exc).__name__}: {exc}"[:300])


# ---------------------------------------------------------------------------------------------
# SFT


def bench_sft(base, tokenizer, rows, config: Config, device, log) -> tuple[object, list[dict], dict]:
    from datasets import Dataset
    from trl import SFTConfig

    from app.models import lora_config
    from app.training import flops
    from app.training.data import tokenize_sft
    from app.training.distributed import world
    from app.training.overrides import host_arguments
    from app.training.trainers import FastSFTTrainer

    examples = tokenize_sft(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    mean_len = sum(len(s.ids) for s in examples) / len(examples)
    check = check_sft(base, examples, config, device, log) if config.check else {}
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    n_lora = lora_param_count(lora_model(base, config, 0.0))
    base = _restore_base(base) if hasattr(base, "unload") else base
    # The sft phase's settings (app/phases/sft.py), with TRL's trainer class swapped for ours.
    args = SFTConfig(per_device_train_batch_size=config.sft_batch_size * config.sft_grad_accum,
                     gradient_accumulation_steps=1, max_steps=_our_steps(config), learning_rate=2e-4,
                     lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=10**6, max_length=1024,
                     completion_only_loss=True, gradient_checkpointing=False, **host_arguments(),
                     **_common_args(config, device, "bench-sft-", workers=2 if device.type == "cuda" else 0))
    trainer = FastSFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora_config(config.lora_r, config.lora_alpha, config.lora_dropout),
                             compile=config.compile and device.type == "cuda")
    run = time_trainer(trainer, device, config.warmup_steps, config.steps, config.profile_steps,
                       _trace(config, "sft"))
    base = _restore_base(trainer.model)
    rate = run["tokens"] / run["seconds"]
    per_gpu = rate / world()[1]
    fpt = flops.lora_train_flops_per_token(base.config, mean_len, n_lora)
    rows_out = [_row("sft", "ours", device, tokens_per_s=round(rate), tokens_per_s_per_gpu=round(per_gpu),
                     peak_gib=run["peak_gib"], mfu=_round(flops.mfu(per_gpu * fpt, device_name(device))),
                     setting=f"FastSFTTrainer, batch {config.sft_batch_size}x{config.sft_grad_accum}: packed varlen, "
                             f"fused LoRA, chunked log-probs, no checkpointing{_compiled(config)}",
                     steps=run["steps"], seconds=round(run["seconds"], 2), step_ms=run["step_ms"], **check,
                     **_profile(run))]
    log(f"sft ours: {rate:,.0f} tokens/s over {run['steps']} steps, peak {run['peak_gib']} GiB")
    if config.peer:
        rows_out.append(_guard(peer_sft, "sft", device, log, base, tokenizer, dataset, config, device, log, n_lora,
                               mean_len))
        base = _restore_base(base)
    return base, rows_out, {"mean_tokens_per_example": round(mean_len, 1)}


def check_sft(base, examples, config: Config, device, log) -> dict:
    """Loss and LoRA gradients on one batch: fast path vs the plain path (padding, full logits, PEFT)."""
    import torch

    from app.training.loss import logprobs_from_logits, reference_token_loss
    from app.training.packing import pad, unpack_batch
    from app.training.trainers import PackingCollator, fast_path, packed_logits

    model = lora_model(base, config, 0.0)  # dropout off: both paths must see the same function
    torch.manual_seed(config.seed + 7)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something so gradients reach A too
            torch.nn.init.normal_(p, std=0.02)
    batch = examples[:4]
    padded = {k: v.to(device) for k, v in pad(batch, pad_id=3).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        plain, n = reference_token_loss(model, padded)
    plain.backward()
    plain_grads = {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    # The noise floor: the plain path again on the same batch with 8 more columns of padding
    # (the same function; only the shapes, hence bf16 rounding, differ).
    wider = {k: torch.nn.functional.pad(v, (0, 8), value=3 if k == "input_ids" else (0 if k == "attention_mask"
                                                                                   else -100))
             for k, v in padded.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        plain2, _ = reference_token_loss(model, wider)
    plain2.backward()
    noise = math.sqrt(sum(float((p.grad.float() - plain_grads[k]).norm() ** 2) for k, p in model.named_parameters()
                          if p.requires_grad) / max(sum(float(g.norm() ** 2) for g in plain_grads.values()), 1e-30))
    model.zero_grad(set_to_none=True)
    features = [{"input_ids": s.ids, "labels": [t if m else -100 for t, m in zip(s.ids, s.loss_mask)]} for s in batch]
    packed = unpack_batch({k: v.to(device) if torch.is_tensor(v) else v
                           for k, v in PackingCollator()(features).items()})
    targets = packed["shift_labels"][0].index_select(0, packed["target_index"])
    with fast_path(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logps = logprobs_from_logits(packed_logits(model, packed), targets)
    fast = -logps.sum() / targets.numel()
    fast.backward()
    num = sum(float((p.grad.float() - plain_grads[k]).norm() ** 2) for k, p in model.named_parameters()
              if p.requires_grad)
    den = sum(float(g.norm() ** 2) for g in plain_grads.values())
    result = {"check_loss_plain": round(float(plain.detach()), 5), "check_loss_ours": round(float(fast.detach()), 5),
              "check_grad_rel_diff": round(math.sqrt(num / max(den, 1e-30)), 5),
              "check_loss_plain_repadded": round(float(plain2.detach()), 5), "check_grad_rel_noise": round(noise, 5)}
    log(f"sft check: plain loss {float(plain):.5f} (re-padded {float(plain2.detach()):.5f}), fast loss {float(fast):.5f} "
        f"({n} target tokens); gradient relative difference fast vs plain {result['check_grad_rel_diff']}, "
        f"plain vs plain re-padded {result['check_grad_rel_noise']}")
    _restore_base(model)
    return result


def peer_sft(base, tokenizer, dataset, config: Config, device, log, n_lora: int, mean_len: float) -> dict:
    """TRL SFTTrainer at its defaults (batch 2, accum 2, gradient checkpointing), LoRA as ours."""
    from trl import SFTConfig, SFTTrainer

    from app.models import lora_config
    from app.training import flops
    from app.training.distributed import world

    args = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=_peer_steps(config),
                     logging_steps=10**6, **_common_args(config, device, "bench-sft-peer-"))
    trainer = SFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(config.lora_r, config.lora_alpha, config.lora_dropout))
    run = time_trainer(trainer, device, 1, config.peer_steps, _peer_profile_steps(config),
                       _trace(config, "sft-peer"))
    _restore_base(trainer.model)  # takes TRL's adapter out of the shared base model
    rate = run["tokens"] / run["seconds"]
    per_gpu = rate / world()[1]
    fpt = flops.lora_train_flops_per_token(base.config, mean_len, n_lora)
    log(f"sft peer: {rate:,.0f} tokens/s")
    return _row("sft", "peer: TRL SFTTrainer defaults", device, tokens_per_s=round(rate),
                tokens_per_s_per_gpu=round(per_gpu), peak_gib=run["peak_gib"],
                mfu=_round(flops.mfu(per_gpu * fpt, device_name(device))),
                setting="batch 2x2, gradient checkpointing, padded", steps=run["steps"],
                seconds=round(run["seconds"], 2), **_profile(run))


# ---------------------------------------------------------------------------------------------
# DPO


def _sft_adapter(base, config: Config, seed: int):
    """A LoRA model whose adapter stands in for a trained SFT adapter (B != 0): the policy's start."""
    import torch

    torch.manual_seed(seed)  # LoRA A is drawn when the adapter is made: seeded too, so runs start alike
    model = lora_model(base, config, config.lora_dropout)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model


def bench_dpo(base, tokenizer, rows, config: Config, device, log) -> tuple[object, list[dict], dict]:
    import time as _time

    from datasets import Dataset
    from trl import DPOConfig

    from app.training import flops
    from app.training.data import tokenize_pairs
    from app.training.distributed import world
    from app.training.overrides import host_arguments
    from app.training.trainers import FastDPOTrainer

    pairs = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                           [r["rejected"] for r in rows])
    seqs = [s for p in pairs for s in p.sequences(1024)]
    mean_len = sum(len(s.ids) for s in seqs) / len(seqs)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["rejected"]}
                                 for r in rows])
    model = _sft_adapter(base, config, config.seed + 11)
    n_lora = lora_param_count(model)
    check = check_dpo(model, pairs, device, log, config.dpo_share_prompt) if config.check else {}
    # The dpo phase's settings (app/phases/dpo.py), with TRL's trainer class swapped for ours.
    args = DPOConfig(per_device_train_batch_size=config.dpo_batch_size * config.dpo_grad_accum,
                     gradient_accumulation_steps=1, max_steps=_our_steps(config), learning_rate=5e-6,
                     lr_scheduler_type="cosine", warmup_steps=0.05, beta=0.1, max_length=1024, logging_steps=10,
                     logging_first_step=True, gradient_checkpointing=False,
                     precompute_ref_log_probs=config.precompute_reference, **host_arguments(),
                     **_common_args(config, device, "bench-dpo-", workers=2 if device.type == "cuda" else 0))
    reset_memory(device)
    started = _time.perf_counter()
    trainer = FastDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             compile=config.compile and device.type == "cuda",
                             cuda_graphs=config.dpo_graphs and device.type == "cuda",
                             graph_pad_multiple=config.graph_pad_multiple, share_prompt=config.dpo_share_prompt)
    setup_seconds = _time.perf_counter() - started
    graph_window = _graph_window(trainer, config.warmup_steps, config.warmup_steps + config.steps)
    trainer.add_callback(graph_window)
    # The precomputed reference splits the pairs over the ranks: all of them, in the slowest rank's time.
    _, ref_seconds = across_ranks(0, trainer.reference_seconds, device)
    run = time_trainer(trainer, device, config.warmup_steps, config.steps, config.profile_steps,
                       _trace(config, "dpo"))
    step0 = run["log"][0] if run["log"] else {}
    base = _restore_base(trainer.model)
    size = world()[1]
    timed_pairs = run["steps"] * config.dpo_batch_size * config.dpo_grad_accum * size
    train_rate = timed_pairs / run["seconds"]
    # With the inline reference the step already includes it; precomputed, its pass is added.
    ref_rate = len(pairs) / ref_seconds if ref_seconds else None
    end_to_end = 1 / (1 / train_rate + 1 / ref_rate) if ref_rate else train_rate
    tok_rate = run["tokens"] / run["seconds"]
    fpt = flops.lora_train_flops_per_token(base.config, mean_len, n_lora)
    log(f"dpo ours: {train_rate:.2f} pairs/s training steps, reference pass {ref_rate or 0:.1f} pairs/s "
        f"({ref_seconds:.1f}s of {setup_seconds:.1f}s setup), {end_to_end:.2f} pairs/s together; step-0 loss "
        f"{step0.get('loss')} margin {step0.get('rewards/margins')} (ln 2 = {math.log(2):.6f})")
    rows_out = [_row("dpo", "ours", device, pairs_per_s=round(end_to_end, 2),
                     pairs_per_s_per_gpu=round(end_to_end / size, 2), train_pairs_per_s=round(train_rate, 2),
                     reference_pairs_per_s=round(ref_rate, 1) if ref_rate else None, tokens_per_s=round(tok_rate),
                     tokens_per_s_per_gpu=round(tok_rate / size), peak_gib=run["peak_gib"],
                     mfu=_round(flops.mfu(tok_rate / size * fpt, device_name(device))),
                     step0_loss=step0.get("loss"), step0_margin=step0.get("rewards/margins"),
                     setting=f"FastDPOTrainer, batch {config.dpo_batch_size}x{config.dpo_grad_accum}: reference "
                             + ("precomputed in large rows" if config.precompute_reference else
                                "= frozen adapter on the same packed row")
                             + (", each prompt computed once for both completions" if config.dpo_share_prompt else "")
                             + f", fused LoRA, chunked log-probs{_compiled(config)}"
                             + (", steps replayed as CUDA graphs" if trainer.graph_stats else ""),
                     steps=run["steps"], seconds=round(run["seconds"], 2), step_ms=run["step_ms"], **check,
                     **graph_window.summary(), **_profile(run))]
    log(f"dpo ours, cuda graphs: {graph_window.summary()}")
    if config.peer:
        rows_out.append(_guard(peer_dpo, "dpo", device, log, base, tokenizer, dataset, config, device, log, n_lora,
                               mean_len))
        base = _restore_base(base)
    return base, rows_out, {"mean_tokens_per_sequence": round(mean_len, 1)}


def _graph_window(trainer, start: int, end: int):
    """A callback with the CUDA-graph counts of the whole run and of the timed steps alone (`summary()`)."""
    from transformers import TrainerCallback

    class GraphWindow(TrainerCallback):
        def __init__(self):
            self.at = {}

        def on_step_end(self, args, state, control, **kwargs):
            stats = trainer.running_graph_stats
            if stats is not None and state.global_step in (start, end):
                self.at[state.global_step] = stats.as_dict()

        def summary(self) -> dict:
            if trainer.graph_stats is None:
                return {"graphs_off": trainer.graphs_off_reason}
            out = {"graphs": trainer.graph_stats.as_dict()}
            if start in self.at and end in self.at:  # new row lengths in the timed steps ran eagerly, then captured
                out["graphs_timed_window"] = {k: round(self.at[end][k] - self.at[start][k], 2) for k in
                                              ("graphs_captured", "graph_replays", "eager_steps", "capture_seconds")}
            return out

    return GraphWindow()


def check_dpo(model, pairs, device, log, share_prompt: bool = True) -> dict:
    """Summed completion log-probs of a few pairs: packed fast path (in the layout ours trains on) vs the
    plain padded path."""
    import torch

    from app.training.packing import IGNORE, pad, unpack_batch
    from app.training.trainers import PairCollator, fast_path, pair_sums

    features = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs[:2]]
    seqs = [s for p in pairs[:2] for s in p.sequences(1024)]
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        padded = {k: v.to(device) for k, v in pad(seqs, pad_id=3).items()}
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        labels = padded["labels"][:, 1:]
        logp = logits[:, :-1].float().log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
        plain = (logp * (labels != IGNORE)).sum(1)
        batch = unpack_batch({k: v.to(device) if torch.is_tensor(v) else v
                              for k, v in PairCollator(1024, share_prompt=share_prompt)(features).items()})
        with fast_path(model):
            chosen, rejected = pair_sums(model, batch)
        fast = torch.stack([chosen, rejected], 1).reshape(-1)
    model.train()
    diff = float((fast - plain).abs().max())
    log(f"dpo check: summed log-probs plain {[round(x, 3) for x in plain.tolist()]} vs fast "
        f"{[round(x, 3) for x in fast.tolist()]} (max abs diff {diff:.4f})")
    return {"check_logp_plain": [round(x, 3) for x in plain.tolist()],
            "check_logp_ours": [round(x, 3) for x in fast.tolist()], "check_logp_max_abs_diff": round(diff, 4)}


def peer_dpo(base, tokenizer, dataset, config: Config, device, log, n_lora: int, mean_len: float) -> dict:
    """TRL DPOTrainer at its defaults; the policy is a LoRA model, TRL keeps a frozen adapter copy as reference."""
    from trl import DPOConfig, DPOTrainer

    from app.training import flops
    from app.training.distributed import world

    model = _sft_adapter(base, config, config.seed + 11)
    args = DPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=_peer_steps(config),
                     logging_steps=1, **_common_args(config, device, "bench-dpo-peer-"))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    run = time_trainer(trainer, device, 1, config.peer_steps, _peer_profile_steps(config),
                       _trace(config, "dpo-peer"))
    _restore_base(trainer.model)
    trainer.model_wrapped = trainer.model = trainer.ref_model = None
    size = world()[1]
    rate = 4 * run["steps"] * size / run["seconds"]  # batch 2 x accumulation 2 per rank
    tok_rate = run["tokens"] / run["seconds"]
    step0 = run["log"][0] if run["log"] else {}
    log(f"dpo peer: {rate:.2f} pairs/s, step-0 loss {step0.get('loss')}")
    return _row("dpo", "peer: TRL DPOTrainer defaults", device, pairs_per_s=round(rate, 2),
                pairs_per_s_per_gpu=round(rate / size, 2), tokens_per_s=round(tok_rate),
                tokens_per_s_per_gpu=round(tok_rate / size), peak_gib=run["peak_gib"],
                mfu=_round(flops.mfu(tok_rate / size * flops.lora_train_flops_per_token(base.config, mean_len, n_lora),
                                     device_name(device))),
                step0_loss=step0.get("loss"),
                setting="batch 2x2, gradient checkpointing, reference forward each step (adapter copy)",
                steps=run["steps"], seconds=round(run["seconds"], 2), **_profile(run))


# ---------------------------------------------------------------------------------------------
# Generation


def bench_generate(base, tokenizer, rows, config: Config, device, log) -> tuple[object, list[dict], dict]:
    """New tokens/s of our backend and of HF generate. Data-parallel, each rank generates every
    world-size-th prompt; the figure is all ranks' new tokens over the slowest rank's seconds."""
    import torch

    from app.generation import HFGenerator, Sampling, vllm_available
    from app.training import flops
    from app.training.distributed import world

    rank, size = world()
    prompts = [r["prompt"] for r in rows[:config.gen_prompts]]
    sampling = Sampling(n=1, temperature=1.0, max_new_tokens=config.gen_new_tokens, stop=())
    base.eval()
    base.config.use_cache = True
    prompt_len = sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
    fpt = flops.forward_flops_per_token(base.config, prompt_len + config.gen_new_tokens / 2)
    prompts = prompts[rank::size]
    out = []
    if vllm_available():
        log("generate: vLLM is installed, but the bench builds its model in memory and vLLM loads from disk; "
            "timing our HF path")
    static_options = [True] if config.gen_static_cache and config.compile and device.type == "cuda" else []
    for static in static_options + [False]:
        # Our backend's HF path, exactly as rollouts and eval run it, around the in-memory model.
        ours = HFGenerator.around(base, tokenizer, batch_size=config.gen_batch_size, static_cache=static)
        reset_memory(device)
        # Warm-up: with the static cache, one batch of the timed call's shape (compilation, graph recording).
        started = time.perf_counter()
        if static:
            ours.generate(prompts[:config.gen_batch_size], sampling)
        else:
            ours.generate(prompts[:min(len(prompts), 8)], Sampling(n=1, temperature=1.0, max_new_tokens=4, stop=()))
        warmup_seconds = time.perf_counter() - started
        start = time.perf_counter()
        done = ours.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        tokens, seconds = across_ranks(sum(c.num_tokens for cs in done for c in cs), seconds, device)
        rate = tokens / seconds
        how = "static KV cache, decoding step compiled into CUDA graphs" if static else "dynamic KV cache, eager"
        log(f"generate ours ({how}): {rate:,.0f} new tokens/s (batch {config.gen_batch_size}); "
            f"warm-up {warmup_seconds:.1f}s")
        out.append(_row("generate", "ours" if static or not static_options else "ours, eager", device,
                        tokens_per_s=round(rate), tokens_per_s_per_gpu=round(rate / size), peak_gib=peak_gib(device),
                        mfu=_round(flops.mfu(rate / size * fpt, device_name(device))),
                        setting=f"app.generation HF backend, batch {config.gen_batch_size}, sampling, {how}",
                        seconds=round(seconds, 2), warmup_seconds=round(warmup_seconds, 1)))
    if config.peer:
        batch = config.peer_gen_batch_size
        reset_memory(device)
        start = time.perf_counter()
        tokens = 0
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                enc = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True).to(device)
                output = base.generate(**enc, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                       max_new_tokens=config.gen_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
                new = output[:, enc["input_ids"].shape[1]:]
                tokens += int((new != tokenizer.pad_token_id).sum())
        tokens, seconds = across_ranks(tokens, time.perf_counter() - start, device)
        rate = tokens / seconds
        log(f"generate peer: {rate:,.0f} new tokens/s (HF generate, batch {batch})")
        out.append(_row("generate", "peer: HF generate", device, tokens_per_s=round(rate),
                        tokens_per_s_per_gpu=round(rate / size), peak_gib=peak_gib(device),
                        mfu=_round(flops.mfu(rate / size * fpt, device_name(device))),
                        setting=f"batch {batch}, sampling", seconds=round(seconds, 2)))
    base.config.use_cache = False
    return base, out, {}


# ---------------------------------------------------------------------------------------------


def _round(x, digits: int = 3):
    return None if x is None else round(x, digits)


def ratios(rows: list[dict]) -> None:
    """Add ours/peer to each 'ours' row, on the phase's headline figure."""
    for phase, key in (("sft", "tokens_per_s"), ("dpo", "pairs_per_s"), ("generate", "tokens_per_s")):
        ours = next((r for r in rows if r["phase"] == phase and r["who"] == "ours"), None)
        peer = next((r for r in rows if r["phase"] == phase and r["who"].startswith("peer")), None)
        if ours and peer and peer.get(key):
            ours["ours_over_peer"] = round(ours[key] / peer[key], 2)


def table(rows: list[dict]) -> str:
    lines = ["| phase | who | throughput | peak GiB | MFU | ours/peer | device |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            figure = "failed: " + r["error"][:60]
        elif "pairs_per_s" in r:
            figure = f"{r['pairs_per_s']:,} pairs/s"
            if r.get("reference_pairs_per_s"):
                figure += f" ({r['train_pairs_per_s']} training, {r['reference_pairs_per_s']} reference pass)"
            if r["world_size"] > 1:
                figure += f", {r['pairs_per_s_per_gpu']:,} per GPU"
        else:
            figure = f"{r['tokens_per_s']:,} tokens/s"
            if r["world_size"] > 1:
                figure += f", {r['tokens_per_s_per_gpu']:,} per GPU"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        devices = f"{r['world_size']} x {r['device']}" if r["world_size"] > 1 else r["device"]
        lines.append(f"| {r['phase']} | {r['who']} | {figure} | {r.get('peak_gib', '-')} | {mfu} | "
                     f"{r.get('ours_over_peer', '')} | {devices} |")
    return "\n".join(lines)


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
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    if rank != 0:
        return report
    print(table(results), flush=True)
    if config.out:
        with open(config.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return report
