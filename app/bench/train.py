"""The training benches: ours (the trainers the sft and dpo phases run, at their settings) against
TRL's trainers at their defaults, each after a check that the fast path computes the plain
path's loss."""

from __future__ import annotations

import math
import os
import tempfile
import time

from app.bench import flops
from app.bench.config import Config
from app.bench.measure import across_ranks, device_name, guarded, peak_gib, reset_memory, result_row, rounded, \
    time_trainer
from app.bench.model import lora_model, lora_param_count, restore_base

# ---------------------------------------------------------------------------------------------
# Settings shared by ours and the peers


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
    os.makedirs(config.trace_dir, exist_ok=True)
    return os.path.join(config.trace_dir, f"{name}.json")


def _common_args(config: Config, device, prefix: str, workers: int = 0) -> dict:
    return dict(output_dir=tempfile.mkdtemp(prefix=prefix), report_to="none", save_strategy="no",
                bf16=device.type == "cuda", use_cpu=device.type != "cuda", disable_tqdm=True, seed=config.seed,
                dataloader_num_workers=workers)


# ---------------------------------------------------------------------------------------------
# SFT


def bench_sft(base, tokenizer, rows, config: Config, device, log) -> tuple[object, list[dict], dict]:
    from datasets import Dataset
    from trl import SFTConfig

    from app.models import lora_config
    from app.training.data import tokenize_sft
    from app.training.distributed import world
    from app.training.overrides import host_arguments
    from app.training.trainers import FastSFTTrainer

    examples = tokenize_sft(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    mean_len = sum(len(s.ids) for s in examples) / len(examples)
    check = check_sft(base, examples, config, device, log) if config.check else {}
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    n_lora = lora_param_count(lora_model(base, config, 0.0))
    base = restore_base(base) if hasattr(base, "unload") else base
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
    base = restore_base(trainer.model)
    rate = run["tokens"] / run["seconds"]
    per_gpu = rate / world()[1]
    fpt = flops.lora_train_flops_per_token(base.config, mean_len, n_lora)
    setting = (f"FastSFTTrainer, batch {config.sft_batch_size}x{config.sft_grad_accum} as one micro-batch: packed "
               f"varlen, fused LoRA, chunked log-probs, no checkpointing{_compiled(config)}")
    rows_out = [result_row("sft", "ours", device, tokens_per_s=round(rate), tokens_per_s_per_gpu=round(per_gpu),
                           peak_gib=run["peak_gib"], mfu=rounded(flops.mfu(per_gpu * fpt, device_name(device))),
                           setting=setting, steps=run["steps"], seconds=round(run["seconds"], 2),
                           step_ms=run["step_ms"], **check,
                           **_profile(run))]
    log(f"sft ours: {rate:,.0f} tokens/s over {run['steps']} steps, peak {run['peak_gib']} GiB")
    if config.peer:
        rows_out.append(guarded(peer_sft, "sft", device, log, base, tokenizer, dataset, config, device, log, n_lora,
                                mean_len))
        base = restore_base(base)
    return base, rows_out, {"mean_tokens_per_example": round(mean_len, 1)}


def check_sft(base, examples, config: Config, device, log) -> dict:
    """Loss and LoRA gradients on one batch: fast path vs the plain path (padding, full logits, PEFT)."""
    import torch

    from app.training.loss import logprobs_from_logits
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
    restore_base(model)
    return result


def peer_sft(base, tokenizer, dataset, config: Config, device, log, n_lora: int, mean_len: float) -> dict:
    """TRL SFTTrainer at its defaults (batch 2, accum 2, gradient checkpointing), LoRA as ours."""
    from trl import SFTConfig, SFTTrainer

    from app.models import lora_config
    from app.training.distributed import world

    args = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=_peer_steps(config),
                     logging_steps=10**6, **_common_args(config, device, "bench-sft-peer-"))
    trainer = SFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(config.lora_r, config.lora_alpha, config.lora_dropout))
    run = time_trainer(trainer, device, 1, config.peer_steps, _peer_profile_steps(config),
                       _trace(config, "sft-peer"))
    restore_base(trainer.model)  # takes TRL's adapter out of the shared base model
    rate = run["tokens"] / run["seconds"]
    per_gpu = rate / world()[1]
    fpt = flops.lora_train_flops_per_token(base.config, mean_len, n_lora)
    log(f"sft peer: {rate:,.0f} tokens/s")
    return result_row("sft", "peer: TRL SFTTrainer defaults", device, tokens_per_s=round(rate),
                      tokens_per_s_per_gpu=round(per_gpu), peak_gib=run["peak_gib"],
                      mfu=rounded(flops.mfu(per_gpu * fpt, device_name(device))),
                      setting="batch 2x2, gradient checkpointing, padded", steps=run["steps"],
                      seconds=round(run["seconds"], 2), **_profile(run))


def reference_token_loss(model, batch: dict) -> tuple:
    """The unoptimised SFT loss: full logits, fp32 cross-entropy, mean over target tokens.

    What TRL's path computes on a padded batch: the yardstick `check_sft` holds the fast path to.
    """
    import torch.nn.functional as F

    from app.training.packing import IGNORE

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    n = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum") / max(n, 1)
    return loss, n


# ---------------------------------------------------------------------------------------------
# DPO


def sft_adapter(base, config: Config, seed: int):
    """A LoRA model whose adapter stands in for a trained SFT adapter (B != 0): the policy's start."""
    import torch

    torch.manual_seed(seed)  # LoRA A is drawn when the adapter is made: seeded too, so runs start alike
    model = lora_model(base, config, config.lora_dropout)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model


def bench_dpo(base, tokenizer, rows, config: Config, device, log) -> tuple[object, list[dict], dict]:
    from datasets import Dataset
    from trl import DPOConfig

    from app.training.data import tokenize_pairs
    from app.training.distributed import world
    from app.training.overrides import host_arguments
    from app.training.trainers import FastDPOTrainer, dpo_loss_arguments

    pairs = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                           [r["rejected"] for r in rows])
    seqs = [s for p in pairs for s in p.sequences(1024)]
    mean_len = sum(len(s.ids) for s in seqs) / len(seqs)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["rejected"]}
                                 for r in rows])
    model = sft_adapter(base, config, config.seed + 11)
    n_lora = lora_param_count(model)
    check = check_dpo(model, pairs, device, log, config.dpo_share_prompt) if config.check else {}
    # The dpo phase's settings (app/phases/dpo.py), with TRL's trainer class swapped for ours.
    args = DPOConfig(per_device_train_batch_size=config.dpo_batch_size * config.dpo_grad_accum,
                     gradient_accumulation_steps=1, max_steps=_our_steps(config), learning_rate=5e-6,
                     lr_scheduler_type="cosine", warmup_steps=0.05, beta=0.1, max_length=1024, logging_steps=10,
                     logging_first_step=True, gradient_checkpointing=False,
                     **dpo_loss_arguments(config.dpo_sft_weight),
                     precompute_ref_log_probs=config.precompute_reference, **host_arguments(),
                     **_common_args(config, device, "bench-dpo-", workers=2 if device.type == "cuda" else 0))
    reset_memory(device)
    started = time.perf_counter()
    trainer = FastDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             compile=config.compile and device.type == "cuda",
                             cuda_graphs=config.dpo_graphs and device.type == "cuda",
                             graph_pad_multiple=config.graph_pad_multiple, share_prompt=config.dpo_share_prompt,
                             nll_group_pairs=config.dpo_batch_size)
    setup_seconds = time.perf_counter() - started
    graph_window = _graph_window(trainer, config.warmup_steps, config.warmup_steps + config.steps)
    trainer.add_callback(graph_window)
    # The precomputed reference splits the pairs over the ranks: all of them, in the slowest rank's time.
    _, ref_seconds = across_ranks(0, trainer.reference_seconds, device)
    run = time_trainer(trainer, device, config.warmup_steps, config.steps, config.profile_steps,
                       _trace(config, "dpo"))
    step0 = run["log"][0] if run["log"] else {}
    base = restore_base(trainer.model)
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
    setting = (f"FastDPOTrainer, {'DPO + NLL weight ' + format(config.dpo_sft_weight, 'g') if config.dpo_sft_weight else 'DPO'}, "
               f"batch {config.dpo_batch_size}x{config.dpo_grad_accum} as one micro-batch: reference "
               + ("precomputed in large rows" if config.precompute_reference else
                  "= frozen adapter on the same packed row")
               + (", each prompt computed once for both completions" if config.dpo_share_prompt else "")
               + f", fused LoRA, chunked log-probs{_compiled(config)}"
               + (", steps replayed as CUDA graphs" if trainer.graph_stats else ""))
    rows_out = [result_row("dpo", "ours", device, pairs_per_s=round(end_to_end, 2),
                           pairs_per_s_per_gpu=round(end_to_end / size, 2), train_pairs_per_s=round(train_rate, 2),
                           reference_pairs_per_s=round(ref_rate, 1) if ref_rate else None, tokens_per_s=round(tok_rate),
                           tokens_per_s_per_gpu=round(tok_rate / size), peak_gib=run["peak_gib"],
                           mfu=rounded(flops.mfu(tok_rate / size * fpt, device_name(device))),
                           step0_loss=step0.get("loss"), step0_margin=step0.get("rewards/margins"),
                           setting=setting, steps=run["steps"], seconds=round(run["seconds"], 2),
                           step_ms=run["step_ms"], **check,
                           **graph_window.summary(), **_profile(run))]
    log(f"dpo ours, cuda graphs: {graph_window.summary()}")
    if config.peer:
        rows_out.append(guarded(peer_dpo, "dpo", device, log, base, tokenizer, dataset, config, device, log, n_lora,
                                mean_len))
        base = restore_base(base)
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
    """TRL DPOTrainer at its defaults, with ours' loss (the NLL term at --dpo-sft-weight); the policy is a LoRA
    model, TRL keeps a frozen adapter copy as reference."""
    from trl import DPOConfig, DPOTrainer

    from app.training.distributed import world
    from app.training.trainers import dpo_loss_arguments

    model = sft_adapter(base, config, config.seed + 11)
    args = DPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=_peer_steps(config),
                     logging_steps=1, **dpo_loss_arguments(config.dpo_sft_weight),
                     **_common_args(config, device, "bench-dpo-peer-"))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    run = time_trainer(trainer, device, 1, config.peer_steps, _peer_profile_steps(config),
                       _trace(config, "dpo-peer"))
    restore_base(trainer.model)
    trainer.model_wrapped = trainer.model = trainer.ref_model = None
    size = world()[1]
    rate = 4 * run["steps"] * size / run["seconds"]  # batch 2 x accumulation 2 per rank
    tok_rate = run["tokens"] / run["seconds"]
    step0 = run["log"][0] if run["log"] else {}
    log(f"dpo peer: {rate:.2f} pairs/s, step-0 loss {step0.get('loss')}")
    return result_row("dpo", "peer: TRL DPOTrainer defaults", device, pairs_per_s=round(rate, 2),
                      pairs_per_s_per_gpu=round(rate / size, 2), tokens_per_s=round(tok_rate),
                      tokens_per_s_per_gpu=round(tok_rate / size), peak_gib=run["peak_gib"],
                      mfu=rounded(flops.mfu(tok_rate / size * flops.lora_train_flops_per_token(base.config, mean_len,
                                                                                               n_lora),
                                            device_name(device))),
                      step0_loss=step0.get("loss"),
                      setting="batch 2x2, gradient checkpointing, reference forward each step (adapter copy)",
                      steps=run["steps"], seconds=round(run["seconds"], 2), **_profile(run))
