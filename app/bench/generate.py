"""The generation bench: new tokens/s of the backends rollouts and eval run, against HF `generate`.

  ours      `app.generation.HFGenerator` around the in-memory model (with a static KV cache and
            the decoding step in CUDA graphs on CUDA, and eager), the base model;
  ours, vllm  `app.generation_vllm.VLLMGenerator`, one engine, the base model and an SFT-shaped
            LoRA adapter (the bench's rank, all linear layers) served by name, as the phases do;
  peer      HF `generate`, batch 64.

Every row samples `--gen-samples` completions per prompt (temperature 1, no stop strings: a
random model rarely ends early). vLLM loads from a directory, so the model, its tokenizer and
the adapter are written to a temporary one first (timed: `write_seconds`); on a GPU the HF copy
leaves the GPU while the engine runs. The vLLM rows need one process (VLLMGenerator starts one
engine per GPU by itself); under the launcher they are left out, with a line saying so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from app.bench import flops
from app.bench.config import Config
from app.bench.measure import across_ranks, device_name, guarded, peak_gib, reset_memory, result_row, rounded
from app.bench.model import restore_base
from app.bench.train import sft_adapter


def _rate_row(who: str, device, tokens: int, seconds: float, fpt: float, setting: str, memory: bool = True,
              **extra) -> dict:
    """A generate row: `tokens` new tokens in `seconds` on this rank, as a global rate. `memory`: this
    process's peak GPU memory is the row's (not for vLLM, whose engine runs in a process of its own)."""
    from app.training.distributed import world

    tokens, seconds = across_ranks(tokens, seconds, device)
    rate, size = tokens / seconds, world()[1]
    return result_row("generate", who, device, tokens_per_s=round(rate), tokens_per_s_per_gpu=round(rate / size),
                      peak_gib=peak_gib(device) if memory else None,
                      mfu=rounded(flops.mfu(rate / size * fpt, device_name(device))), setting=setting,
                      seconds=round(seconds, 2), new_tokens=tokens, **extra)


def _new_tokens(done) -> int:
    return sum(c.num_tokens for completions in done for c in completions)


def bench_generate(base, tokenizer, rows, config: Config, device, log) -> tuple[object, list[dict], dict]:
    """Data-parallel, each rank generates every world-size-th prompt; a figure is all ranks' new
    tokens over the slowest rank's seconds."""
    from app.generation import Sampling
    from app.training.distributed import world

    rank, size = world()
    prompts = [r["prompt"] for r in rows[:config.gen_prompts]]
    sampling = Sampling(n=config.gen_samples, temperature=1.0, max_new_tokens=config.gen_new_tokens, stop=())
    base.eval()
    base.config.use_cache = True
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    fpt = flops.forward_flops_per_token(base.config, sum(lengths) / len(lengths) + config.gen_new_tokens / 2)
    prompts = prompts[rank::size]
    out = _hf_rows(base, tokenizer, prompts, sampling, config, device, log, fpt)
    if config.peer:
        out.append(_peer_row(base, tokenizer, prompts, config, device, log, fpt))
    if config.gen_vllm:
        base, vllm_rows = _vllm_rows(base, tokenizer, prompts, sampling, max(lengths), config, device, log, fpt)
        out.extend(vllm_rows)
    base.config.use_cache = False
    return base, out, {"mean_prompt_tokens": round(sum(lengths) / len(lengths), 1), "samples_per_prompt": sampling.n}


def _hf_rows(base, tokenizer, prompts, sampling, config: Config, device, log, fpt: float) -> list[dict]:
    """Our backend's HF path, exactly as rollouts and eval run it, around the in-memory model."""
    from app.generation import HFGenerator, Sampling

    out = []
    static_options = [True] if config.gen_static_cache and config.compile and device.type == "cuda" else []
    for static in static_options + [False]:
        ours = HFGenerator.around(base, tokenizer, batch_size=config.gen_batch_size, static_cache=static)
        reset_memory(device)
        # Warm-up: with the static cache, one batch of the timed call's shape (compilation, graph recording).
        started = time.perf_counter()
        if static:
            ours.generate(prompts[:config.gen_batch_size // sampling.n], sampling)
        else:
            ours.generate(prompts[:min(len(prompts), 8)], Sampling(n=1, temperature=1.0, max_new_tokens=4, stop=()))
        warmup_seconds = time.perf_counter() - started
        start = time.perf_counter()
        done = ours.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        how = "static KV cache, decoding step compiled into CUDA graphs" if static else "dynamic KV cache, eager"
        row = _rate_row("ours" if static or not static_options else "ours, eager", device, _new_tokens(done), seconds,
                        fpt, f"app.generation HF backend, batch {config.gen_batch_size}, n={sampling.n}, {how}",
                        warmup_seconds=round(warmup_seconds, 1))
        log(f"generate ours ({how}): {row['tokens_per_s']:,} new tokens/s (batch {config.gen_batch_size}); "
            f"warm-up {warmup_seconds:.1f}s")
        out.append(row)
    return out


def _peer_row(base, tokenizer, prompts, config: Config, device, log, fpt: float) -> dict:
    import torch

    batch = config.peer_gen_batch_size
    reset_memory(device)
    start = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            enc = tokenizer(prompts[i:i + batch], return_tensors="pt", padding=True).to(device)
            output = base.generate(**enc, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                   max_new_tokens=config.gen_new_tokens, num_return_sequences=config.gen_samples,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = output[:, enc["input_ids"].shape[1]:]
            tokens += int((new != tokenizer.pad_token_id).sum())
    row = _rate_row("peer: HF generate", device, tokens, time.perf_counter() - start, fpt,
                    f"batch {batch}, n={config.gen_samples}, sampling")
    log(f"generate peer: {row['tokens_per_s']:,} new tokens/s (HF generate, batch {batch})")
    return row


def _vllm_rows(base, tokenizer, prompts, sampling, longest_prompt: int, config: Config, device, log,
               fpt: float) -> tuple[object, list[dict]]:
    """VLLMGenerator on the bench's model written to disk: the base model, then the SFT-shaped adapter."""
    from app.generation import vllm_available
    from app.training.distributed import world

    if world()[1] > 1:
        log("generate: the vLLM rows need one process (VLLMGenerator starts one engine per GPU itself); "
            "run `python -m app bench generate` without the launcher for them")
        return base, []
    if not vllm_available():
        log("generate: vLLM is not installed; timing the HF paths only")
        return base, []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        started = time.perf_counter()
        base_dir, adapter_dir = Path(tmp) / "base", Path(tmp) / "sft"
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        adapter = sft_adapter(base, config, config.seed + 11)
        adapter.save_pretrained(adapter_dir)
        base = restore_base(adapter)
        base.config.use_cache = True
        write_seconds = time.perf_counter() - started
        log(f"generate: model and adapter written for vLLM in {write_seconds:.1f}s")
        on_gpu = device.type == "cuda"
        if on_gpu:
            base.to("cpu")  # the engine gets the GPU's memory
        reset_memory(device)
        try:
            rows = guarded(_time_vllm, "generate", device, log, str(base_dir), str(adapter_dir), prompts, sampling,
                           longest_prompt, config, device, log, fpt, write_seconds, who="ours, vllm")
        finally:
            if on_gpu:
                base.to(device)
    return base, rows if isinstance(rows, list) else [rows]


def _vllm_memory(config: Config, device, log) -> float:
    """`--gen-vllm-memory`, lowered to what is free on the GPU now (vLLM refuses to start on a share it
    cannot have; the HF rows' compiled graphs may still hold some)."""
    if device.type != "cuda":
        return config.gen_vllm_memory
    import torch

    free, total = torch.cuda.mem_get_info(device)
    share = min(config.gen_vllm_memory, round(free / total - 0.02, 2))
    log(f"generate: vLLM may take {share:.0%} of the GPU's memory ({free / 2**30:.0f} of {total / 2**30:.0f} GiB free)")
    return share


def _time_vllm(base_dir: str, adapter_dir: str, prompts, sampling, longest_prompt: int, config: Config, device, log,
               fpt: float, write_seconds: float) -> list[dict]:
    from app.generation import Sampling
    from app.generation_vllm import VLLMGenerator

    memory = _vllm_memory(config, device, log)
    started = time.perf_counter()
    generator = VLLMGenerator(base_dir, {"sft": adapter_dir}, bf16=device.type == "cuda",
                              max_model_len=longest_prompt + config.gen_new_tokens, seed=config.seed, engines=1,
                              gpu_memory_utilization=memory,
                              max_num_seqs=config.gen_vllm_max_seqs or None, log=log)
    start_seconds = time.perf_counter() - started
    log(f"generate: vLLM engine started in {start_seconds:.1f}s")
    in_flight = f"max {config.gen_vllm_max_seqs} sequences in flight" if config.gen_vllm_max_seqs else \
        "vLLM's default sequences in flight"
    out = []
    try:
        for adapter in (None, "sft"):
            generator.generate(prompts[:min(len(prompts), 8)], Sampling(n=1, temperature=1.0, max_new_tokens=4,
                                                                        stop=()), adapter=adapter)
            start = time.perf_counter()
            done = generator.generate(prompts, sampling, adapter=adapter)
            seconds = time.perf_counter() - start
            what = f"+ SFT-shaped LoRA r{config.lora_r} (all linear)" if adapter else "base"
            row = _rate_row(f"ours, vllm {what}", device, _new_tokens(done), seconds, fpt,
                            f"app.generation_vllm VLLMGenerator, one engine, {in_flight}, n={sampling.n}, {what}",
                            memory=False, engine_start_seconds=round(start_seconds, 1),
                            write_seconds=round(write_seconds, 1), gpu_memory_utilization=memory)
            log(f"generate ours (vLLM, {what}): {row['tokens_per_s']:,} new tokens/s")
            out.append(row)
    finally:
        generator.close()
    return out
