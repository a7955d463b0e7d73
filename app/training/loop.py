"""Our own SFT loop over the fast-path components, without the HF Trainer.

The phases run TRL's trainers with these components inside (`trainers.py`); this loop is the
ablation and upper bound that `python -m app.training.variants` measures (docs/perf-notes.md).
It takes a PEFT LoRA model (base weights frozen) and tokenised data, and does what TRL's
SFTTrainer does with the same settings: the same examples per optimizer step (per-device batch x
gradient accumulation x ranks, in a seeded shuffled order, last batch kept), the same loss on
them (mean over all target tokens of the step), AdamW with transformers' LR schedules and
gradient clipping at `max_grad_norm`. What differs is how a step is computed:

* the step's sequences are packed into rows of at most `max_tokens` tokens (no padding),
  attention never crosses a sequence boundary (varlen flash attention);
* LoRA projections run fused (`lora.fused_lora`), no gradient checkpointing by default;
* log-probs come from hidden states in chunks (`loss.token_logprobs`), never full fp32 logits;
* gradient accumulation micro-steps are merged into one packed row when they fit, so "large
  micro-batches" never change the update;
* the host never waits for the GPU inside a step (losses are read back only when logged).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from app.training import distributed
from app.training.attention import packed_attention
from app.training.lora import fused_lora
from app.training.loss import selected_logprobs
from app.training.packing import Packed, Sequence, pack, split_by_tokens


@dataclass
class Settings:
    learning_rate: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 16  # examples (SFT) or pairs (DPO) per device and micro-step, as TRL's per_device_train_batch_size
    grad_accum: int = 1
    max_tokens: int = 8192  # tokens per packed row: a memory knob only, the update does not depend on it
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int | None = 1024
    beta: float = 0.1  # DPO
    seed: int = 0
    max_steps: int | None = None  # stop early (the bench)
    log_every: int = 10
    fuse_lora: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False
    disable_dropout: bool = False  # TRL's DPOTrainer turns dropout off; its SFTTrainer does not


@dataclass
class Result:
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens through forward+backward, this rank
    examples: int = 0  # sequences (SFT) or pairs (DPO), this rank
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)
    peak_memory_gib: float = 0.0


# ---------------------------------------------------------------------------------------------
# Model plumbing


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model):
    lm = _causal_lm(model)
    return getattr(lm, lm.base_model_prefix)


def lm_head_weight(model) -> torch.Tensor:
    return _causal_lm(model).get_output_embeddings().weight


def packed_hidden(model, batch: Packed) -> torch.Tensor:
    """Last hidden states (T, d) of one packed row."""
    out = _decoder(model)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                          packed_cu_seqlens=batch.cu_seqlens, packed_max_seqlen=batch.max_seqlen)
    return out.last_hidden_state[0]


@contextlib.contextmanager
def fast_path(model, settings: Settings):
    """Packed attention, fused LoRA and the other switches, for the duration of training."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(packed_attention(model))
        if settings.fuse_lora:
            stack.enter_context(fused_lora(model))
        if settings.gradient_checkpointing:
            _causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        if settings.compile:
            stack.enter_context(compiled_layers(model))
        yield model


@contextlib.contextmanager
def compiled_layers(model):
    """Compile each decoder layer (the norms, rotary, SwiGLU and LoRA glue fuse into few kernels).

    Layers share code, so the compiled graph is reused across them; the first steps pay the
    compilation (a minute or two for a 7B model).
    """
    layers = list(_decoder(model).layers)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _optimizer(model, settings: Settings, total_steps: int, device: torch.device):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (expected a PEFT LoRA model)")
    kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=settings.weight_decay, **kwargs)
    scheduler = get_scheduler(settings.lr_scheduler, optimizer,
                              num_warmup_steps=math.ceil(total_steps * settings.warmup_ratio),
                              num_training_steps=total_steps)
    return params, optimizer, scheduler


def step_plan(num_examples: int, settings: Settings, world_size: int) -> list[list[int]]:
    """Indices of the examples of each optimizer step, all epochs, as TRL would draw them.

    One seeded permutation per epoch (a fractional last epoch takes its first steps), global
    batches of batch_size x grad_accum x world_size, the last, smaller batch kept.
    """
    per_step = settings.batch_size * settings.grad_accum * world_size
    steps_per_epoch = math.ceil(num_examples / per_step)
    total = math.ceil(steps_per_epoch * settings.epochs)
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        generator = torch.Generator().manual_seed(settings.seed + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
        for s in range(steps_per_epoch):
            if len(plan) == total:
                break
            plan.append(order[s * per_step:(s + 1) * per_step])
        epoch += 1
    return plan


def _log_default(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# SFT


def sft_loss(model, sequences: list[Sequence], total_targets: int, device, max_tokens: int,
             backward: bool = True) -> torch.Tensor:
    """Sum over `sequences` of -log p(target), divided by `total_targets`; backward per packed row.

    Returns the (detached) loss contribution of these sequences.
    """
    weight = lm_head_weight(model)
    total = torch.zeros((), device=device)
    for group in split_by_tokens(sequences, max_tokens):
        batch = pack(group, pin_memory=device.type == "cuda").to(device)
        logps, _ = selected_logprobs(packed_hidden(model, batch), weight, batch.targets, batch.target_index)
        loss = -logps.sum() / max(total_targets, 1)
        if backward:
            loss.backward()
        total += loss.detach()
    return total


def train_sft(model, examples: list[Sequence], settings: Settings, device=None,
              log: Callable[[str], None] = _log_default, on_step: Callable[[int], None] | None = None) -> Result:
    """Train `model` (PEFT LoRA) on tokenised prompt-completion `examples`, completion-only loss."""
    rank, world_size, default_device = distributed.setup()
    device = torch.device(device) if device is not None else default_device
    plan = step_plan(len(examples), settings, world_size)
    params, optimizer, scheduler = _optimizer(model, settings, len(plan), device)
    if settings.disable_dropout:
        _disable_dropout(model)
    model.train()
    result = Result()
    running, running_steps = torch.zeros((), device=device), 0
    start = time.perf_counter()
    with fast_path(model, settings):
        for step, indices in enumerate(plan, start=1):
            seqs = [examples[i] for i in indices]
            total_targets = sum(s.num_targets for s in seqs)  # global: every rank knows the whole step
            mine = seqs[rank::world_size]
            running += sft_loss(model, mine, total_targets, device, settings.max_tokens)
            distributed.all_reduce_grads(params)
            _optimizer_step(params, optimizer, scheduler, settings)
            result.tokens += sum(len(s.ids) for s in mine)
            result.examples += len(mine)
            running_steps += 1
            if on_step is not None:
                on_step(step)
            if step % settings.log_every == 0 or step == len(plan):
                value = float(distributed.all_reduce_sum(running.clone())) / running_steps
                result.losses.append((step, value))
                log(f"sft step {step}/{len(plan)} loss {value:.4f} lr {scheduler.get_last_lr()[0]:.3g}")
                running.zero_()
                running_steps = 0
    result.steps = len(plan)
    result.seconds = time.perf_counter() - start
    result.peak_memory_gib = _peak_memory(device)
    return result


def _optimizer_step(params, optimizer, scheduler, settings: Settings) -> None:
    if settings.max_grad_norm and settings.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _peak_memory(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30
