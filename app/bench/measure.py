"""Timing and reporting shared by the bench's phases: drained timers, global rates over ranks,
the timing harness every trainer (ours and the peers) goes through, and the result table."""

from __future__ import annotations

import gc
import platform
import time

from app.bench.profiling import StepProfiler, format_summary

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
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def result_row(phase: str, who: str, device, **values) -> dict:
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


def guarded(fn, phase: str, device, log, *args, who: str = "peer") -> dict:
    """Run `fn(*args)` for one row; if it breaks (a missing package, an incompatible version), say so in its row."""
    try:
        return fn(*args)
    except Exception as exc:
        log(f"{phase} {who} failed: {type(exc).__name__}: {exc}")
        return result_row(phase, who, device, error=f"{type(exc).__name__}: {exc}"[:300])


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


def rounded(x, digits: int = 3):
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
