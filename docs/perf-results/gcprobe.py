"""The bench with every garbage collection timed (count, total and longest pause per generation).

    python docs/perf-results/gcprobe.py sft --no-peer --no-check --steps 12 --warmup-steps 4
    FREEZE=1 python docs/perf-results/gcprobe.py ...   # gc.freeze() when training begins

Perf-notes experiment 27.
"""
import gc
import os
import sys
import time

sys.path.insert(0, os.getcwd())
pauses = {0: [], 1: [], 2: []}
started = {}


def probe(phase, info):
    if phase == "start":
        started["t"] = time.perf_counter()
    else:
        pauses[info["generation"]].append((time.perf_counter(), 1e3 * (time.perf_counter() - started["t"])))


if os.environ.get("FREEZE") == "1":
    import app.bench as bench
    from transformers import TrainerCallback
    orig = bench.time_trainer

    def time_trainer(trainer, *a, **k):
        class Freeze(TrainerCallback):
            def on_train_begin(self, *x, **y):
                gc.collect(); gc.freeze()
        trainer.add_callback(Freeze())
        return orig(trainer, *a, **k)
    bench.time_trainer = time_trainer

gc.callbacks.append(probe)
t0 = time.perf_counter()
from app.cli import main  # noqa: E402

rc = main(["bench"] + sys.argv[1:])
for g, ps in pauses.items():
    late = [ms for t, ms in ps if t - t0 > 60]  # after the first minute (model build, compilation)
    if g == 2:
        print("gen2 pauses (s since start: ms):", [(round(t - t0), round(ms)) for t, ms in ps], flush=True)
    print(f"GC gen{g}: {len(ps)} collections, {sum(ms for _, ms in ps):.0f} ms in all; after 60 s: {len(late)}, "
          f"{sum(late):.0f} ms, longest {max(late, default=0):.1f} ms", flush=True)
sys.exit(rc)
