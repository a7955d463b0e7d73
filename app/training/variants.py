"""Which lever buys what: one SFT step timed with the fast path's parts switched on one by one.

    python -m app.training.variants                 # Mistral-7B shape on the GPU
    python -m app.training.variants --shape tiny    # smoke test (CPU)

Each variant trains LoRA (r=16, all linear layers, dropout 0.05) on the same GSM8K-length
examples, batch 16 per step, and reports tokens/s (real tokens) and peak memory:

  plain          padded batch, PEFT's LoRA forward, full logits + fp32 cross-entropy, bf16 autocast,
                 no checkpointing (what a hand-tuned HF/TRL setup does)
  packed         + packed rows with varlen attention, loss from hidden states in chunks
  fused          + fused LoRA linear (our default path)
  fused-b32      the same at batch 32 (twice the tokens per step)
  compiled       + torch.compile on each decoder layer

Writes one JSON line per variant to stdout (and `--out`). The results are in docs/perf-notes.md.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> list[dict]:
    import torch

    from app import bench
    from app.training.data import tokenize_sft
    from app.training.loop import Settings, train_sft
    from app.training.loss import reference_token_loss
    from app.training.packing import pad

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mistral-7b", choices=list(bench.SHAPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = bench.Config(shape=args.shape, examples=512)
    base = bench.build_model(config, device)
    tokenizer = bench.word_tokenizer(base.config.vocab_size)
    rows = bench.texts(config, base.config.vocab_size)
    examples = tokenize_sft(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    total_steps = args.warmup_steps + args.steps

    def plain(model, batch_size: int):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        model.train()
        t0 = tokens = 0
        for step in range(total_steps):
            if step == args.warmup_steps:
                bench.Timer(0, device).sync()
                t0, tokens = time.perf_counter(), 0
            seqs = examples[step * batch_size:(step + 1) * batch_size]
            batch = {k: v.to(device) for k, v in pad(seqs, pad_id=3).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _ = reference_token_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += sum(len(s.ids) for s in seqs)
        return tokens, bench.Timer(0, device).sync() - t0

    def fast(batch_size: int, **switches):
        def run(model, _):
            settings = Settings(batch_size=batch_size, max_steps=total_steps, log_every=10**9, lr_scheduler="cosine",
                                warmup_ratio=0.03, **switches)
            timer = bench.Timer(args.warmup_steps, device)
            plan_tokens = []

            def on_step(step):
                timer(step)

            from app.training.loop import step_plan

            plan = step_plan(len(examples), settings, 1)[args.warmup_steps:]
            plan_tokens = sum(len(examples[i].ids) for s in plan for i in s)
            train_sft(model, examples, settings, device=device, log=lambda m: None, on_step=on_step)
            return plan_tokens, timer.stop()
        return run

    variants = {
        "plain": (plain, 16),
        "packed": (fast(16, fuse_lora=False), 16),
        "fused": (fast(16), 16),
        "fused-b32": (fast(32), 32),
        "compiled": (fast(16, compile=True), 16),
    }
    wanted = [v for v in args.only.split(",") if v] or list(variants)
    results = []
    for name in wanted:
        fn, batch_size = variants[name]
        model = bench.lora_model(base, config, 0.05)
        bench.reset_memory(device)
        started = time.perf_counter()
        try:
            tokens, seconds = fn(model, batch_size)
            row = {"variant": name, "tokens_per_s": round(tokens / seconds), "peak_gib": bench.peak_gib(device),
                   "batch": batch_size, "wall_s": round(time.perf_counter() - started, 1)}
        except torch.OutOfMemoryError:
            row = {"variant": name, "error": "out of memory", "batch": batch_size}
        except Exception as exc:  # a variant that breaks must not hide the others' numbers
            row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:400], "batch": batch_size}
        row["device"] = bench.device_name(device)
        print(json.dumps(row), flush=True)
        results.append(row)
        model.zero_grad(set_to_none=True)
        base = bench._restore_base(model)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
