"""Text generation behind one interface, so rollouts and eval don't care which engine runs.

    generator = make_generator("auto", base_dir, adapters={"sft": sft_dir, "dpo": dpo_dir})
    outputs = generator.generate(prompts, Sampling(n=4, temperature=0.8), adapter="sft")
    outputs[i][j]  # the j-th sample for prompt i: Completion(text, num_tokens, truncated)

The base model is loaded once; adapters are applied by name (`adapter=None` is the
base model), nothing is merged. `auto` picks vLLM when it is importable and HF
`generate` otherwise. A completion that hit `max_new_tokens` without ending is
marked `truncated`, so scoring can exclude it instead of reading a cut-off number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.log import progress
from app.prompts import STOP_STRINGS, cut_at_stop

BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = STOP_STRINGS


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    truncated: bool


@dataclass
class GenerationStats:
    prompts: int = 0
    completions: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, prompts: int, completions: list[list[Completion]], seconds: float) -> None:
        self.prompts += prompts
        self.completions += sum(len(c) for c in completions)
        self.tokens += sum(x.num_tokens for c in completions for x in c)
        self.seconds += seconds

    def line(self, backend: str) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        qps = self.prompts / self.seconds if self.seconds else 0.0
        return (f"{backend}: {self.completions} completions for {self.prompts} prompts, {self.tokens} tokens in "
                f"{self.seconds:.1f}s = {rate:,.0f} tokens/s, {qps:.2f} prompts/s")

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "completions": self.completions, "tokens": self.tokens,
                "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None}


class Generator(Protocol):
    name: str
    stats: GenerationStats

    def generate(self, prompts: list[str], sampling: Sampling, adapter: str | None = None,
                 desc: str = "generate") -> list[list[Completion]]: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # vLLM raises more than ImportError when its platform is missing
        return False
    return True


def make_generator(backend: str, base_model: str, adapters: dict[str, str | Path] | None = None, *,
                   bf16: bool = True, batch_size: int = 64, max_model_len: int = 1024, seed: int = 0,
                   static_cache: bool = False, max_num_seqs: int | None = None,
                   request_seeds: bool = True) -> Generator:
    """The backend named (`auto`: vLLM if importable); `static_cache` applies to the HF backend only,
    `max_num_seqs` (sequences in flight) and `request_seeds` (app/generation_vllm.py) to vLLM only.
    Either generator's `start_times` says how long its start took (`start_s`) and its weight loading
    (`load_s`; vLLM adds its compile and CUDA-graph steps)."""
    adapters = dict(adapters or {})
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        from app.generation_vllm import VLLMGenerator

        return VLLMGenerator(base_model, adapters, bf16=bf16, batch_size=batch_size, max_model_len=max_model_len,
                             seed=seed, max_num_seqs=max_num_seqs, request_seeds=request_seeds)
    return HFGenerator(base_model, adapters, bf16=bf16, batch_size=batch_size, static_cache=static_cache)


STATIC_PROMPT_MULTIPLE = 256  # one shape for GSM8K-length prompts of every variant


class HFGenerator:
    """transformers `generate` with PEFT adapters switched by name; the portable fallback.

    `static_cache=True` generates with a preallocated KV cache, and on a GPU transformers then
    compiles the decoding step into CUDA graphs: a decoding step of a 7B model launches ~1,000
    kernels from Python and the host, not the GPU, sets the pace. Graphs need fixed shapes, so
    every batch of one `generate` call has the same shape: prompts are left-padded to the call's
    longest, rounded up to a multiple of 256 (so calls with other prompts share the shape), and
    the last batch is filled up with repeats whose outputs are dropped. Each new shape or adapter
    costs a compilation (~40 s on a 7B, docs/PERFORMANCE.md): worth it for rollouts' tens of
    thousands of samples, not for eval's three models over a thousand questions.
    """

    name = "hf"

    def __init__(self, base_model: str, adapters: dict[str, str | Path], bf16: bool = True, batch_size: int = 64,
                 static_cache: bool = False):
        from app.models import load_causal_lm, load_tokenizer

        started = time.time()
        model = load_causal_lm(base_model, bf16=bf16)
        if adapters:
            from peft import PeftModel

            first, *rest = adapters.items()
            model = PeftModel.from_pretrained(model, str(first[1]), adapter_name=first[0])
            for name, path in rest:
                model.load_adapter(str(path), adapter_name=name)
        self._serve(model, load_tokenizer(base_model), list(adapters), batch_size, static_cache)
        elapsed = round(time.time() - started, 2)
        self.start_times = {"start_s": elapsed, "load_s": elapsed}

    @classmethod
    def around(cls, model, tokenizer, adapters: list[str] = (), batch_size: int = 64,
               static_cache: bool = False) -> "HFGenerator":
        """This generator around a model already in memory (the bench); `adapters`: the PEFT adapters it carries."""
        generator = cls.__new__(cls)
        generator._serve(model, tokenizer, list(adapters), batch_size, static_cache)
        return generator

    def _serve(self, model, tokenizer, adapters: list[str], batch_size: int, static_cache: bool) -> None:
        tokenizer.padding_side = "left"
        model.eval()
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.batch_size, self.static_cache = batch_size, static_cache
        self.stats = GenerationStats()
        self.start_times: dict = {}

    def generate(self, prompts: list[str], sampling: Sampling, adapter: str | None = None,
                 desc: str = "generate") -> list[list[Completion]]:
        import contextlib

        import torch

        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {self.adapters}")
        if adapter is not None:
            self.model.set_adapter(adapter)
            context = contextlib.nullcontext()
        else:
            context = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()

        started = time.time()
        results: list[list[Completion]] = []
        per_batch = max(1, self.batch_size // max(1, sampling.n))
        eos_id = self.tokenizer.eos_token_id
        static = self.static_cache
        shape = {"padding": True}
        if static and prompts:
            longest = max(len(ids) for ids in self.tokenizer(prompts)["input_ids"])
            shape = {"padding": "max_length", "max_length": -(-longest // STATIC_PROMPT_MULTIPLE) * STATIC_PROMPT_MULTIPLE}
        with context, torch.inference_mode():
            for start in progress(range(0, len(prompts), per_batch), desc=f"{desc} [hf]", unit="batch"):
                chunk = prompts[start:start + per_batch]
                filled = chunk + [chunk[-1]] * (per_batch - len(chunk)) if static else chunk
                torch.manual_seed(sampling.seed + start)
                batch = self.tokenizer(filled, return_tensors="pt", **shape).to(self.model.device)
                greedy = sampling.temperature <= 0
                output = self.model.generate(
                    **batch, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                    top_k=None, num_return_sequences=sampling.n, pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=eos_id, **({"cache_implementation": "static"} if static else {}))
                new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
                for i in range(len(chunk)):
                    results.append([self._completion(ids, eos_id, sampling)
                                    for ids in new_tokens[i * sampling.n:(i + 1) * sampling.n]])
        self.stats.add(len(prompts), results, time.time() - started)
        return results

    def _completion(self, ids: list[int], eos_id: int, sampling: Sampling) -> Completion:
        pad_id = self.tokenizer.pad_token_id
        ended = eos_id in ids
        if ended:
            ids = ids[: ids.index(eos_id) + 1]
        elif pad_id is not None and pad_id != eos_id:
            ids = [t for t in ids if t != pad_id]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, sampling.stop)  # the caller's stops, as vLLM applies them
        num_tokens = len(ids)
        if stopped:
            num_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        truncated = not ended and not stopped and num_tokens >= sampling.max_new_tokens
        return Completion(text=text, num_tokens=num_tokens, truncated=truncated)

    def close(self) -> None:
        self.model = None
