"""DPO steps replayed as CUDA graphs against the same steps run eagerly: one model build, one process.

    python docs/perf-results/graphs_ab.py          # from the repo root, on a GPU; OUT=dir gets the JSON
    PLAN=s5a python docs/perf-results/graphs_ab.py # the first run: graphs without the shared prompt

PLAN=s5b (the default; `h200-s5-graphs-ab-2.*`):
1. The replay check: after 6 steps of a graph run (rows padded to multiples of 128), one captured
   step run eagerly twice and replayed, same weights and batch: loss, log-probs and gradients of
   the replay against the eager run's, beside eager against eager (the noise floor of atomic
   adds); then 10 synchronised steady steps (replay, clipping, optimizer).
2. Speed: the bench's DPO run with graphs and the shared prompt (once with every step drained,
   for each step's own time), without graphs, and each lever alone.

PLAN=s5a (`h200-s5-graphs-ab-1.*`):

1. Same loss: 8 steps logged at every step, rows padded to 4096 tokens (one shape: step 1 runs
   eagerly and is captured, steps 2-8 are replays), once with graphs and once with the same
   padded rows run eagerly (no graph ever captured). The two should agree to the
   nondeterminism of atomic adds (index_add, flash attention's backward), far below bf16 rounding.
2. Speed: the bench's DPO run (the phase's settings, rows padded to multiples of 128 tokens)
   with graphs, then without, no peer; the graph counts of the timed window are in the rows.
"""
import json
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.getcwd())
from app import bench  # noqa: E402
from app.training import graphs as graphs_module  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
STEPS = int(os.environ.get("STEPS", 40))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cfg = bench.Config(phase="dpo", peer=False, check=False, shape=os.environ.get("SHAPE", "mistral-7b"))
t0 = time.time()
base = bench.build_model(cfg, device)
tok = bench.word_tokenizer(base.config.vocab_size)
rows = bench.texts(cfg, base.config.vocab_size)
log(f"built in {time.time() - t0:.0f}s")
report = {"device": bench.device_name(device), "torch": torch.__version__, "correctness": {}, "speed": []}


def save():
    with open(os.path.join(OUT, "graphs-ab.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)


def logged_run(name: str, cuda_graphs: bool, max_graphs: int = 32, steps: int = 8, pad: int = 4096, callbacks=None):
    global base
    from datasets import Dataset
    from trl import DPOConfig

    from app.training.trainers import FastDPOTrainer

    saved = graphs_module.StepGraphs.__init__.__defaults__
    graphs_module.StepGraphs.__init__.__defaults__ = (max_graphs, None)
    t = time.time()
    try:
        model = bench._sft_adapter(base, cfg, cfg.seed + 11)
        args = DPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
                         learning_rate=5e-6, lr_scheduler_type="cosine", warmup_steps=0.05, beta=0.1, max_length=1024,
                         logging_steps=1, gradient_checkpointing=False,
                         **bench._common_args(cfg, device, "ab-", workers=2))
        dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["rejected"]}
                                     for r in rows])
        trainer = FastDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, compile=device.type == "cuda",
                                 cuda_graphs=cuda_graphs, graph_pad_multiple=pad,
                                 share_prompt=os.environ.get("PLAN") != "s5a")
        for callback in (callbacks(trainer) if callbacks else []):
            trainer.add_callback(callback)
        trainer.train()
        hist = [h for h in trainer.state.log_history if "loss" in h]
        out = {"loss": [h["loss"] for h in hist], "grad_norm": [h["grad_norm"] for h in hist],
               "margins": [h["rewards/margins"] for h in hist], "logps_chosen": [h["logps/chosen"] for h in hist],
               "graphs": trainer.graph_stats.as_dict() if trainer.graph_stats else None,
               "graphs_off": trainer.graphs_off_reason, "wall_s": round(time.time() - t)}
        base = bench._restore_base(trainer.model)
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        print(out["traceback"], flush=True)
    finally:
        graphs_module.StepGraphs.__init__.__defaults__ = saved
    report["correctness"][name] = out
    log(f"{name}: {json.dumps({k: v for k, v in out.items() if k != 'traceback'})}")
    save()


def replay_check(trainer, at_step: int = 6, repeats: int = 10):
    """At `at_step`: one recorded key's step eagerly twice (the noise floor) and replayed, on the same
    weights and batch; then `repeats` synchronised steady steps (replay + clip + optimizer)."""
    import math

    from transformers import TrainerCallback

    from app.training.trainers import unpack_batch

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != at_step or trainer._graphs is None or not trainer._graphs.recorded:
                return
            graphs = trainer._graphs
            recorded = next(iter(graphs.recorded.values()))
            unwrapped = trainer._unwrap(trainer.model_wrapped)
            params = trainer._trainable()

            def eager():
                for p in params:
                    p.grad = None
                with trainer.autocast_smart_context_manager(cache_enabled=False):
                    loss, per_pair = trainer._loss_and_metrics(unwrapped, unpack_batch(recorded.inputs))
                loss.backward()
                return loss.detach().clone(), per_pair.clone(), [p.grad.detach().clone() for p in params]

            def rel(a, b):
                return math.sqrt(sum(float((x - y).float().norm()) ** 2 for x, y in zip(a, b)) /
                                 max(sum(float(y.float().norm()) ** 2 for y in b), 1e-30))

            l1, m1, g1 = eager()
            l2, m2, g2 = eager()
            for p in params:
                p.grad = None
            lr, mr = graphs._replay(recorded, recorded.inputs)
            gr = [p.grad.detach().clone() for p in params]
            out = {"loss_eager": float(l1), "loss_eager_again": float(l2), "loss_replay": float(lr),
                   "grad_rel_eager_again": rel(g2, g1), "grad_rel_replay": rel(gr, g1),
                   "logps_max_abs_eager_again": float((m2[:, 4:] - m1[:, 4:]).abs().max()),
                   "logps_max_abs_replay": float((mr[:, 4:] - m1[:, 4:]).abs().max()),
                   "row_tokens": int(recorded.inputs["flat_layout"][0][1][1])}
            if device.type != "cuda":
                report["replay_check"] = out
                log(f"replay check: {out}")
                return
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(repeats):
                start.record()
                graphs._replay(recorded, recorded.inputs)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                trainer.optimizer.step()
                for p in params:
                    p.grad = None
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            out["steady_step_ms"] = [round(t, 1) for t in times]
            out["steady_pairs_per_s"] = round(4 / (sorted(times)[len(times) // 2] / 1e3), 2)
            report["replay_check"] = out
            log(f"replay check: {out}")

    return Check()


def speed(name: str, **over):
    global base
    c = bench.Config(**{**cfg.to_dict(), **over})
    t = time.time()
    original = bench.time_trainer
    per_step = []

    def timed(trainer, *args, **kwargs):
        from transformers import TrainerCallback

        class Synced(TrainerCallback):  # only with SYNC=1: every step drained, so its time is its own
            def on_step_end(self, args, state, control, **kw):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                graphs = getattr(trainer, "_graphs", None)
                per_step.append((time.perf_counter(), graphs.stats.replayed if graphs else 0))

        if os.environ.get("SYNC") == "1":
            trainer.add_callback(Synced())
        return original(trainer, *args, **kwargs)

    bench.time_trainer = timed
    try:
        base, out, _ = bench.bench_dpo(base, tok, rows, c, device, log)
        for r in out:
            r["variant"], r["wall_s"] = name, round(time.time() - t)
            if per_step:
                ms = [(round(1e3 * (b[0] - a[0]), 1), b[1] > a[1]) for a, b in zip(per_step, per_step[1:])]
                r["synced_step_ms"] = ms
                replays = sorted(m for m, replayed in ms if replayed)
                if replays:
                    r["replay_step_ms_median"] = replays[len(replays) // 2]
            report["speed"].append(r)
            log(f"{name}: {r.get('pairs_per_s')} pairs/s, peak {r.get('peak_gib')} GiB, step-0 loss {r.get('step0_loss')}, "
                f"graphs {r.get('graphs_timed_window')} / {r.get('graphs')}, replay median {r.get('replay_step_ms_median')} ms, "
                f"step_ms {r.get('step_ms')}")
    except Exception as exc:
        report["speed"].append({"variant": name, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()[-4000:]})
        traceback.print_exc()
    finally:
        bench.time_trainer = original
    save()


plan = os.environ.get("PLAN", "s5b")
if plan == "s5a":  # the first run (h200-s5-graphs-ab-1): graphs only, no prompt sharing, no replay check
    logged_run("graphs", cuda_graphs=True)
    logged_run("padded-eager", cuda_graphs=True, max_graphs=0)
    speed("graphs", dpo_graphs=True, steps=STEPS, warmup_steps=4, dpo_share_prompt=False)
    speed("eager", dpo_graphs=False, steps=12, warmup_steps=4, dpo_share_prompt=False)
else:  # s5b: + each prompt computed once; the replay check; synchronised steps for the steady-state time
    logged_run("graphs", cuda_graphs=True, steps=8, pad=128, callbacks=lambda tr: [replay_check(tr)])
    os.environ["SYNC"] = "1"
    speed("graphs+shared-prompt, synced", dpo_graphs=True, steps=STEPS, warmup_steps=8)
    os.environ["SYNC"] = "0"
    speed("graphs+shared-prompt", dpo_graphs=True, steps=STEPS, warmup_steps=8)
    speed("eager+shared-prompt", dpo_graphs=False, steps=12, warmup_steps=4)
    speed("eager", dpo_graphs=False, steps=12, warmup_steps=4, dpo_share_prompt=False)
    speed("graphs", dpo_graphs=True, steps=STEPS, warmup_steps=8, dpo_share_prompt=False)
log("done")
for r in report["speed"]:
    print(r.get("variant"), r.get("pairs_per_s"), r.get("peak_gib"), r.get("graphs_timed_window"), flush=True)
