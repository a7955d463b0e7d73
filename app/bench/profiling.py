"""Where a training step's time goes: a few steps under torch.profiler, summarised for a person.

    python -m app bench sft --profile-steps 3        # the summary lands in the bench's JSON and log

The two numbers that decide what to optimise next:

* GPU busy: the union of the kernel intervals over the wall time of the profiled steps. Well
  below 100% means the GPU waits for the host (Python, kernel launches, a loader, a sync), and
  faster kernels would not help.
* Host syncs: the CUDA calls that block the host until the GPU has drained its queue (what
  `.item()` on a GPU tensor, a blocking copy to the host or `cuda.synchronize` end in). Each one
  empties the queue the host had built up, so the next kernels wait for Python. (`.item()` on a
  CPU tensor is no sync and is not counted.) The profiler's own closing synchronize is one.

Then the top kernels by GPU time, and the top host-side ops by their own CPU time.
"""

from __future__ import annotations

import time

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _is_python(name: str) -> bool:
    return ".py(" in name or name.startswith("<built-in")


def _python_site(event) -> str:
    """The innermost Python frames around `event` that are not torch's own: where a sync came from."""
    frames, parent = [], event.cpu_parent
    while parent is not None and len(frames) < 2:
        if ".py(" in parent.name and "torch/" not in parent.name:
            frames.append(parent.name)
        parent = parent.cpu_parent
    return " <- ".join(frames) if frames else "(no Python frame)"


def summarise(prof, wall_seconds: float, steps: int, top: int = 12) -> dict:
    """A dict a person can read: GPU busy share, host syncs, top kernels and host ops."""
    from torch.autograd import DeviceType

    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in kernels])
    syncs: dict[str, list[float]] = {}
    sites: dict[str, int] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in SYNC_OPS:
            syncs.setdefault(e.name, []).append(e.time_range.elapsed_us())
            site = _python_site(e)
            sites[site] = sites.get(site, 0) + 1
    averages = [a for a in prof.key_averages() if not _is_python(a.key)]
    device_attr = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    by_gpu = sorted(averages, key=lambda a: getattr(a, device_attr), reverse=True)
    by_cpu = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)
    wall_us = wall_seconds * 1e6
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_seconds * 1e3 / steps, 1),
        "gpu_busy_ms_per_step": round(busy_us / 1e3 / steps, 1),
        "gpu_busy_share": round(busy_us / wall_us, 3) if wall_us else None,
        "kernels_per_step": round(len(kernels) / steps),
        "host_syncs_per_step": {k: round(len(v) / steps, 1) for k, v in syncs.items()},
        "host_sync_ms_per_step": round(sum(sum(v) for v in syncs.values()) / 1e3 / steps, 1),
        "host_sync_sites": {k: round(v / steps, 1) for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:8]},
        "top_gpu": [{"op": a.key[:80], "ms_per_step": round(getattr(a, device_attr) / 1e3 / steps, 2),
                     "calls_per_step": round(a.count / steps, 1)} for a in by_gpu[:top]],
        "top_host": [{"op": a.key[:80], "ms_per_step": round(a.self_cpu_time_total / 1e3 / steps, 2),
                      "calls_per_step": round(a.count / steps, 1)} for a in by_cpu[:top]],
    }


def format_summary(summary: dict) -> str:
    lines = [f"profile: {summary['wall_ms_per_step']} ms per step, GPU busy {summary['gpu_busy_ms_per_step']} ms "
             f"({100 * (summary['gpu_busy_share'] or 0):.0f}%), {summary['kernels_per_step']} kernels per step, "
             f"host syncs {summary['host_syncs_per_step']} ({summary['host_sync_ms_per_step']} ms per step)"]
    if summary.get("host_sync_sites"):
        lines.append("  syncs from: " + "; ".join(f"{k} x{v}" for k, v in summary["host_sync_sites"].items()))
    lines.append("  top kernels (ms per step): "
                 + "; ".join(f"{t['op']} {t['ms_per_step']}" for t in summary["top_gpu"]))
    lines.append("  top host ops (ms per step): "
                 + "; ".join(f"{t['op']} {t['ms_per_step']}" for t in summary["top_host"]))
    return "\n".join(lines)


class StepProfiler:
    """TrainerCallback-shaped: profiles optimizer steps first_step+1 .. first_step+steps.

    Pass `callback()` to a Trainer; after training, `summary` holds `summarise`'s dict (or None
    when the profiled steps never ran).
    """

    def __init__(self, first_step: int, steps: int, device, trace_path: str = ""):
        self.first_step, self.steps, self.device, self.trace_path = first_step, steps, device, trace_path
        self.summary: dict | None = None
        self._prof = None
        self._started = 0.0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_end(self, global_step: int) -> None:
        import torch

        if global_step == self.first_step and self.steps > 0:
            self._sync()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # Python stacks cost host time while profiling; they say where each sync comes from.
            self._prof = torch.profiler.profile(activities=activities, with_stack=True)
            self._prof.__enter__()
            self._started = time.perf_counter()
        elif self._prof is not None and global_step == self.first_step + self.steps:
            self._sync()
            wall = time.perf_counter() - self._started
            self._prof.__exit__(None, None, None)
            if self.trace_path:
                self._prof.export_chrome_trace(self.trace_path)
            self.summary = summarise(self._prof, wall, self.steps)
            self._prof = None

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.step_end(state.global_step)

        return _Callback()
