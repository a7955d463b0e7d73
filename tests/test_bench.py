"""`python -m app bench` on a tiny shape: it runs end to end, ours and the peers, and its loss checks hold.

Not a timing test: CI only checks that the bench works (the numbers come from a GPU, docs/PERFORMANCE.md).
"""

import json
import math

import pytest


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
                         gen_prompts=4, gen_new_tokens=4, gen_batch_size=4, peer_gen_batch_size=2, out=str(out)))
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
    assert dpo["step0_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo["check_logp_max_abs_diff"] < 1e-2
    assert sft["ours_over_peer"] > 0 and "device" in sft
