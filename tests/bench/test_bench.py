"""`python -m app bench` on a tiny shape: it runs end to end, ours and the peers, and its loss checks hold;
under the launcher with two CPU ranks (gloo) it counts both ranks' work.

Not a timing test: CI only checks that the bench works (the numbers come from a GPU, docs/PERFORMANCE.md).
The vLLM rows of `generate` are tests/bench/test_generate.py's.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_phase_is_positional():
    from app.cli import parse

    command, config = parse(["bench", "dpo", "--shape", "tiny", "--steps", "2"])
    assert command == "bench" and config.phase == "dpo" and config.steps == 2
    assert parse(["bench"])[1].phase == "all"


def test_bench_rejects_unknown_phase():
    from app.cli import parse
    from app.errors import ConfigError

    with pytest.raises(ConfigError):
        parse(["bench", "pretrain"])


@pytest.mark.slow
def test_bench_runs_end_to_end_on_a_tiny_shape(tmp_path):
    from app.bench import Config, main

    out = tmp_path / "bench.json"
    report = main(Config(phase="all", shape="tiny", steps=1, warmup_steps=1, peer_steps=1, examples=16,
                         gen_prompts=4, gen_new_tokens=4, gen_batch_size=4, peer_gen_batch_size=2, gen_vllm=False,
                         out=str(out)))
    assert json.loads(out.read_text())["results"] == report["results"]
    rows = {(r["phase"], r["who"].split(":")[0]): r for r in report["results"]}
    assert set(rows) == {(p, w) for p in ("sft", "dpo", "generate") for w in ("ours", "peer")}
    assert all("error" not in r for r in rows.values()), [r for r in rows.values() if "error" in r]
    for (phase, _), row in rows.items():
        assert (row.get("tokens_per_s") or row.get("pairs_per_s")) > 0
    sft = rows["sft", "ours"]
    assert sft["check_loss_ours"] == pytest.approx(sft["check_loss_plain"], rel=1e-5)  # fp32 on the CPU
    assert sft["check_grad_rel_diff"] < 1e-4
    dpo = rows["dpo", "ours"]
    # The default loss is the abel-7b preset's (DPO + NLL weight 1): ln 2 plus the chosen answers' NLL at step 0.
    assert dpo["step0_margin"] == pytest.approx(0.0, abs=1e-6) and dpo["step0_loss"] > math.log(2) + 1
    assert dpo["step0_loss"] == pytest.approx(rows["dpo", "peer"]["step0_loss"], rel=1e-3)  # TRL's, same loss
    assert "DPO + NLL weight 1" in dpo["setting"]
    assert dpo["check_logp_max_abs_diff"] < 1e-2
    assert sft["ours_over_peer"] > 0 and "device" in sft


@pytest.mark.slow
def test_bench_under_the_launcher_counts_both_ranks(tmp_path):
    """Two gloo ranks on the CPU: every phase runs data-parallel, rank 0 reports the global figures."""
    out = tmp_path / "bench.json"
    # As tests/test_launch.py: no PIPELINE_* settings reach the workers, one thread each (2 cores).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "app.launch", "--nproc-per-node", "2", "bench", "all",
                           "--shape", "tiny", "--steps", "2", "--warmup-steps", "1", "--peer-steps", "1",
                           "--examples", "32", "--gen-prompts", "4", "--gen-new-tokens", "4", "--gen-batch-size", "4",
                           "--peer-gen-batch-size", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("| phase | who |") == 1  # only rank 0 prints the table
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    rows = {(r["phase"], r["who"].split(":")[0]): r for r in report["results"]}
    assert set(rows) == {(p, w) for p in ("sft", "dpo", "generate") for w in ("ours", "peer")}
    assert all("error" not in r for r in rows.values()), [r for r in rows.values() if "error" in r]
    for row in rows.values():
        assert row["world_size"] == 2
        assert row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * row["tokens_per_s_per_gpu"], abs=1)
        if row["phase"] == "dpo":
            assert row["pairs_per_s"] > 0
            assert row["pairs_per_s"] == pytest.approx(2 * row["pairs_per_s_per_gpu"], abs=0.02)
    # Both ranks' work counts, in the slowest rank's seconds. SFT: 2 steps x batch 16 x 2 ranks = all 32
    # examples twice (tokens summed over ranks); DPO: 2 steps x batch 2 x accumulation 2 x 2 ranks = 16 pairs.
    sft, dpo = rows["sft", "ours"], rows["dpo", "ours"]
    assert sft["tokens_per_s"] * sft["seconds"] == pytest.approx(
        64 * report["data"]["sft"]["mean_tokens_per_example"], rel=0.05)
    assert 16 / dpo["train_pairs_per_s"] == pytest.approx(dpo["seconds"], abs=0.01)
    # The default loss is DPO + NLL weight 1: ln 2 plus the chosen answers' NLL, with margin 0 at step 0.
    assert dpo["step0_margin"] == pytest.approx(0.0, abs=1e-6) and dpo["step0_loss"] > math.log(2) + 1
