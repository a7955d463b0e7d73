"""A/B of the fast trainers against an earlier version, SFT and DPO; one model build, one process.

    git show 4c7526c:app/training/trainers.py > /tmp/old_trainers.py
    python docs/perf-results/ab_trainers.py /tmp/old_trainers.py             # from the repo root, on a GPU

    git show 9857d78:app/training/trainers.py > /tmp/old_trainers.py
    PLAN=s4 python docs/perf-results/ab_trainers.py /tmp/old_trainers.py

PLAN=s2 (the default) produced `h100-s2-run1-ab.json` (perf-notes experiments 13, 15, 16): the
bench's own SFT and DPO runs (no peer, no loss check, 10 timed steps after 3, 2 profiled), first
with the current trainers, then with the old module swapped in (and transformers' packed-row
detection back on, as it was then), then DPO with a precomputed reference and at 16 pairs per step.

PLAN=s4 produced `h100-s4-ab.json` / `.log` (perf-notes experiment 25): 12 timed steps after 4,
old and new alternating (the old module already skipped the detection), the new ones with 2 more
steps under the profiler.
"""
import contextlib
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from app import bench  # noqa: E402
from app.training import attention  # noqa: E402
import app.training.trainers as new_trainers  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
PLAN = os.environ.get("PLAN", "s2")
spec = importlib.util.spec_from_file_location("old_trainers", sys.argv[1])
old_trainers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old_trainers)


@contextlib.contextmanager
def variant(old: bool):
    saved_mod = sys.modules["app.training.trainers"]
    saved_skip = attention._skip_packed_detection
    if old:
        sys.modules["app.training.trainers"] = old_trainers
        if PLAN == "s2":
            attention._skip_packed_detection = contextlib.nullcontext
    try:
        yield
    finally:
        sys.modules["app.training.trainers"] = saved_mod
        attention._skip_packed_detection = saved_skip


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
steps, warmup, profile = (10, 3, 2) if PLAN == "s2" else (int(os.environ.get("STEPS", 12)), 4, 0)
cfg = bench.Config(phase="sft", steps=steps, warmup_steps=warmup, peer=False, check=False, profile_steps=profile,
                   shape="mistral-7b" if device.type == "cuda" else "tiny")
t0 = time.time()
base = bench.build_model(cfg, device)
tok = bench.word_tokenizer(base.config.vocab_size)
rows = bench.texts(cfg, base.config.vocab_size)
log(f"built in {time.time() - t0:.0f}s")
results = []


def run(name, fn, old=False, **over):
    global base
    c = bench.Config(**{**cfg.to_dict(), **over})
    t = time.time()
    try:
        with variant(old):
            base, out, _ = fn(base, tok, rows, c, device, log)
        for r in out:
            r["variant"] = name
            r["wall_s"] = round(time.time() - t)
            results.append(r)
            p = r.get("profile", {})
            log(f"== {name}: {r.get('tokens_per_s')} tok/s {r.get('pairs_per_s')} pairs/s peak {r.get('peak_gib')} "
                f"busy {p.get('gpu_busy_share')} syncs {p.get('host_syncs_per_step')} step0 {r.get('step0_loss')} "
                f"{r.get('step0_margin')} ({time.time() - t:.0f}s)")
    except Exception as exc:  # keep going: one variant failing must not lose the others
        import traceback
        traceback.print_exc()
        results.append({"variant": name, "error": repr(exc)[:500]})
    json.dump(results, open(f"{OUT}/ab_trainers.json", "w"), indent=1)


if PLAN == "s2":
    run("sft-new", bench.bench_sft)
    run("sft-old", bench.bench_sft, old=True)
    run("dpo-new", bench.bench_dpo)
    run("dpo-old", bench.bench_dpo, old=True)
    run("dpo-new-precompute", bench.bench_dpo, precompute_reference=True)
    run("dpo-new-2x8", bench.bench_dpo, dpo_grad_accum=8, profile_steps=0)
else:
    run("sft-old", bench.bench_sft, old=True)
    run("sft-new", bench.bench_sft, profile_steps=2)
    run("dpo-old", bench.bench_dpo, old=True)
    run("dpo-new", bench.bench_dpo, profile_steps=2)
for r in results:
    print(r.get("variant"), r.get("tokens_per_s"), r.get("pairs_per_s"), r.get("train_pairs_per_s"),
          r.get("peak_gib"), (r.get("profile") or {}).get("gpu_busy_share"), r.get("step0_loss"), r.get("step_ms"),
          r.get("error", ""))
