import torch

from app.bench.profiling import StepProfiler, _union_us, format_summary


def test_busy_time_is_the_union_of_overlapping_kernels():
    assert _union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert _union_us([]) == 0


def test_step_profiler_summarises_the_steps_after_its_first_step():
    profiler = StepProfiler(first_step=1, steps=2, device=torch.device("cpu"))
    x = torch.randn(64, 64)
    for step in range(1, 5):  # profiles the work of steps 2 and 3
        profiler.step_end(step)
        for _ in range(3):
            x = (x @ x).tanh()
    summary = profiler.summary
    assert summary is not None and summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert summary["gpu_busy_share"] == 0 and summary["host_syncs_per_step"] == {}  # CPU: no kernels, no syncs
    assert any(t["op"] == "aten::mm" and t["calls_per_step"] == 3 for t in summary["top_host"])
    assert "profile:" in format_summary(summary)
