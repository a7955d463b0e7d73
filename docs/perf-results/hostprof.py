"""The bench, then PROF_STEPS steps under cProfile, then STANCE_STEPS steps with dynamo's guard checks skipped.

    OUT=/tmp TAG=dpo python docs/perf-results/hostprof.py dpo --no-peer --no-check --steps 8 --warmup-steps 3

Writes <TAG>-<phase>-tottime.txt / -cumulative.txt (the host's Python profile of those steps) and
<TAG>-hostprof.json (ms per step: timed, profiled, guards skipped). What produced
`h100-s4-hostprof-*.txt` (perf-notes experiment 25).
"""
import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
from transformers import TrainerCallback

import app.bench as bench

P = int(os.environ.get("PROF_STEPS", "3"))
S = int(os.environ.get("STANCE_STEPS", "8"))
OUT = os.environ.get("OUT", "/tmp")
TAG = os.environ.get("TAG", "run")
orig_steps = bench._our_steps
bench._our_steps = lambda c: orig_steps(c) + P + 2 + S
orig_time = bench.time_trainer
results = {}
SYNC = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def time_trainer(trainer, device, warm, timed, profile_steps=0, trace_path=""):
    prof = cProfile.Profile()
    phase = "dpo" if "DPO" in type(trainer).__name__ else "sft"
    marks = {}
    a = warm + timed

    class Extra(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a:
                SYNC(); marks["p0"] = time.perf_counter(); prof.enable()

        def on_step_end(self, args, state, control, **kw):
            g = state.global_step
            if g == a + P:
                prof.disable(); SYNC(); marks["p1"] = time.perf_counter()
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
            elif g == a + P + 2:
                SYNC(); marks["s0"] = time.perf_counter()
            elif g == a + P + 2 + S:
                SYNC(); marks["s1"] = time.perf_counter()
                torch.compiler.set_stance("default")

    trainer.add_callback(Extra())
    run = orig_time(trainer, device, warm, timed, profile_steps, trace_path)
    info = {"timed_ms_per_step": 1e3 * run["seconds"] / run["steps"],
            "profiled_ms_per_step": 1e3 * (marks["p1"] - marks["p0"]) / P,
            "skip_guards_ms_per_step": 1e3 * (marks["s1"] - marks["s0"]) / S,
            "step_ms": run["step_ms"]}
    results[phase] = info
    print(f"HOSTPROF {phase}: {json.dumps(info)}", flush=True)
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(70)
        with open(os.path.join(OUT, f"{TAG}-{phase}-{key}.txt"), "w") as fh:
            fh.write(s.getvalue())
    return run


bench.time_trainer = time_trainer
from app.cli import main  # noqa: E402

rc = main(["bench"] + sys.argv[1:])
with open(os.path.join(OUT, f"{TAG}-hostprof.json"), "w") as fh:
    json.dump(results, fh, indent=1)
sys.exit(rc)
