"""Where a phase's wall time goes, and how much GPU memory it took at its peak.

Every phase records `PhaseTimer.metrics()` as `metrics["timing"]` in its manifest:

    {"load_s": 8.1, "compile_s": 41.0, "work_s": 95.3, "other_s": 3.2, "total_s": 147.6,
     "peak_gpu_mem_gib": 61.2, "tokens": 1423000, "tokens_per_s": 14931.5, ...}

- `load_s`: reading the model (and adapters) into memory, from the process's start of it.
- `compile_s`: compilation and engine start: torch.compile of the trainers' layers (measured as
  the first optimizer step's excess over the median step), or a vLLM engine's start minus its
  weight loading (torch.compile, CUDA-graph capture, KV-cache profiling).
- `work_s`: the training steps or the generation itself; `tokens_per_s` is over this time.
- `other_s`: the rest of the phase's wall time (data, scoring, checkpoints, publishing).
- `peak_gpu_mem_gib`: the GPU's memory in use at its peak, sampled through NVML (so the
  memory of a vLLM engine core in a child process counts too), else PyTorch's peak reserve.

`python -m app rehearse` reads these back from the manifests; nothing here changes what a phase does.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

GIB = 1024 ** 3


class GpuMemoryPeak:
    """Samples the GPU's used memory every `interval` seconds in a daemon thread (NVML, no CUDA init)."""

    def __init__(self, interval: float = 0.25):
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._handle = _nvml_handle()
        self._thread = None
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, args=(interval,), name="gpu-memory-peak", daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        import pynvml

        while not self._stop.is_set():
            try:
                used = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
            except Exception:  # noqa: BLE001 - a lost sample is no reason to disturb the phase
                return
            self.peak_bytes = max(self.peak_bytes or 0, int(used))
            self._stop.wait(interval)

    def stop(self) -> float | None:
        """Peak GiB in use (NVML), or PyTorch's peak reserve on this process's device, or None (no GPU)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self.peak_bytes is not None:
            return round(self.peak_bytes / GIB, 2)
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                return round(torch.cuda.max_memory_reserved() / GIB, 2)
        except Exception:  # noqa: BLE001
            pass
        return None


def _nvml_handle():
    """This process's GPU as an NVML handle (CUDA_VISIBLE_DEVICES and LOCAL_RANK respected), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = visible[rank] if rank < len(visible) else str(rank)
        if device.startswith("GPU-") or device.startswith("MIG-"):
            return pynvml.nvmlDeviceGetHandleByUUID(device)
        return pynvml.nvmlDeviceGetHandleByIndex(int(device))
    except Exception:  # noqa: BLE001 - no NVML, no GPU, or a device id we cannot map: no sampling
        return None


class PhaseTimer:
    """Seconds per part of a phase (`with timer.part("load"): ...`, or `timer.add`) and the GPU's peak."""

    PARTS = ("load", "compile", "work")

    def __init__(self):
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}
        self.extra: dict = {}
        self._memory = GpuMemoryPeak()

    @contextlib.contextmanager
    def part(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, float(seconds))

    def add_start(self, start_times: dict) -> None:
        """A generator's start (its `start_times`): weight loading as "load", the rest as "compile"."""
        total = start_times.get("start_s") or 0.0
        load = start_times.get("load_s")
        load = total if load is None else min(load, total)
        self.add("load", load)
        self.add("compile", total - load)

    def move(self, source: str, target: str, seconds: float) -> None:
        """Count `seconds` of part `source` as part `target` (a first step's compilation inside training)."""
        seconds = min(max(0.0, seconds), self.seconds.get(source, 0.0))
        self.seconds[source] = self.seconds.get(source, 0.0) - seconds
        self.add(target, seconds)

    def metrics(self, tokens: int | None = None, **extra) -> dict:
        total = time.monotonic() - self.started
        out = {f"{name}_s": round(self.seconds.get(name, 0.0), 2) for name in self.PARTS}
        out.update({f"{name}_s": round(value, 2) for name, value in self.seconds.items() if name not in self.PARTS})
        out["other_s"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        out["total_s"] = round(total, 2)
        out["peak_gpu_mem_gib"] = self._memory.stop()
        if tokens is not None:
            out["tokens"] = int(tokens)
            work = self.seconds.get("work", 0.0)
            out["tokens_per_s"] = round(tokens / work, 1) if work > 0 else None
        out.update(self.extra)
        out.update(extra)
        return out


def first_step_excess(step_ends: list[float], started: float) -> float:
    """How much longer the first optimizer step took than the median of the others: on a GPU, where
    the trainers compile their layers on the first step, that is the compilation time."""
    if len(step_ends) < 3:
        return 0.0
    durations = [b - a for a, b in zip([started, *step_ends[:-1]], step_ends)]
    return max(0.0, durations[0] - statistics.median(durations[1:]))


def step_clock():
    """A TrainerCallback that notes when training began and when each optimizer step ended;
    `.compile_seconds()` is the first step's excess (see `first_step_excess`)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.started: float | None = None
            self.step_ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.monotonic())

        def compile_seconds(self) -> float:
            return first_step_excess(self.step_ends, self.started) if self.started is not None else 0.0

    return StepClock()
