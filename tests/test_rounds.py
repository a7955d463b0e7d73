"""Rounds of preference training (`pipeline --rounds N`): the plan, the store layout, and two real
rounds on the tiny model: round 2 samples from round 1's DPO policy, pairs its own trajectories,
and trains DPO from that adapter with it as the reference; eval reports both rounds."""

import json
import math
import shutil

import pytest

from app import artifacts
from app.cli import parse
from tests.conftest import SMALL_RUN_FLAGS


@pytest.mark.parametrize("argv,steps", [
    ([], ["sft", "rollouts", "preferences", "dpo", "eval"]),
    (["--rounds", "3"], ["sft", "rollouts", "preferences", "dpo", "round-2/rollouts", "round-2/preferences",
                         "round-2/dpo", "round-3/rollouts", "round-3/preferences", "round-3/dpo", "eval"]),
    (["--rounds", "2", "--from", "dpo"], ["dpo", "round-2/rollouts", "round-2/preferences", "round-2/dpo", "eval"]),
    (["--rounds", "2", "--to", "dpo"], ["sft", "rollouts", "preferences", "dpo", "round-2/rollouts",
                                        "round-2/preferences", "round-2/dpo"]),
])
def test_pipeline_plan(argv, steps):
    from app.phases import step_name

    _, config = parse(["pipeline", *argv], environ={})
    assert [step_name(s) for s in config.steps()] == steps


def test_each_round_has_its_own_place_and_config():
    _, config = parse(["pipeline", "--rounds", "2", "--store", "s3://bucket/p"], environ={})
    round2 = config.phase_configs(2)
    assert (round2["rollouts"].round, round2["preferences"].round, round2["dpo"].round) == (2, 2, 2)
    assert config.phase_configs()["dpo"].round == 1 and round2["eval"].rounds == 2
    assert artifacts.phase_uri("s3://bucket/p", "r1", "dpo", 2) == "s3://bucket/p/runs/r1/round-2/dpo"
    assert artifacts.phase_uri("s3://bucket/p", "r1", "dpo", 1) == "s3://bucket/p/runs/r1/dpo"
    _, evaluation = parse(["eval", "--rounds", "3"], environ={})
    assert evaluation.evaluated_models() == ["base", "sft", "dpo", "dpo-r2", "dpo-r3"]


@pytest.mark.parametrize("argv,message", [(["rollouts", "--round", "0"], "--round must be >= 1"),
                                          (["eval", "--rounds", "0"], "--rounds must be >= 1"),
                                          (["merge", "--phase", "eval", "--round", "2"], "only rollouts")])
def test_bad_rounds_are_config_errors(argv, message):
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse(argv, environ={})


def test_two_rounds_on_the_tiny_model(small_run, tiny_model_dir, tmp_path):
    from app.cli import load_command

    source, run_id, _ = small_run
    store = tmp_path / "store"
    shutil.copytree(source, store)  # round 1 as small_run published it (a store is relocatable)
    shutil.rmtree(store / "runs" / run_id / "eval")  # eval now reports two rounds: another config
    flags = [flag for phase in ("sft", "rollouts", "preferences", "dpo", "eval") for flag in SMALL_RUN_FLAGS[phase]]
    _, config = parse(["pipeline", "--store", str(store), "--run-id", run_id, "--base-model", str(tiny_model_dir),
                       *flags, "--rounds", "2"], environ={})
    result = load_command("pipeline").main(config)

    # Round 1 was already published with the same configs: only round 2 and eval ran.
    assert [name for name, t in result["timings"].items() if not t["skipped"]] == \
        ["round-2/rollouts", "round-2/preferences", "round-2/dpo", "eval"]
    uri = lambda phase, r=1: artifacts.phase_uri(str(store), run_id, phase, r)  # noqa: E731
    rollouts2, prefs2, dpo2 = (artifacts.read_manifest(uri(p, 2)) for p in ("rollouts", "preferences", "dpo"))
    dpo1 = artifacts.read_manifest(uri("dpo"))
    # Lineage: round 2 sampled from round 1's DPO policy and trained from it, on its own pairs.
    assert rollouts2["inputs"]["dpo_round_1"]["uri"] == uri("dpo")
    assert rollouts2["inputs"]["dpo_round_1"]["manifest_sha256"] == artifacts.manifest_digest(dpo1)
    assert prefs2["inputs"]["rollouts"]["uri"] == uri("rollouts", 2)
    assert dpo2["inputs"]["dpo_round_1"]["uri"] == uri("dpo") and dpo2["inputs"]["preferences"]["uri"] == uri("preferences", 2)
    assert "sft" not in dpo2["inputs"]
    assert {e["uri"] for e in artifacts.trace(uri("dpo", 2)) if e.get("phase") == "dpo"} == {uri("dpo", 2), uri("dpo")}
    # The reference is round 1's policy, the same weights the policy starts from: step 0 is ln 2, margin 0.
    assert dpo2["metrics"]["step0_loss"] == pytest.approx(math.log(2), abs=0.02)
    assert dpo2["metrics"]["step0_margin"] == pytest.approx(0.0, abs=0.02)

    from safetensors.torch import load_file

    weights = lambda r: load_file(artifacts.fetch(uri("dpo", r))[0] / "adapter_model.safetensors")  # noqa: E731
    first, second = weights(1), weights(2)
    assert set(first) == set(second) and any(not (first[k] == second[k]).all() for k in first)

    # Eval and the report show every round, and compare round 2 with round 1, paired.
    path, manifest = artifacts.fetch(uri("eval"))
    summary = json.loads((path / "summary.json").read_text())
    assert list(summary["results"]["synthetic-test"]) == ["base", "sft", "dpo", "dpo-r2"]
    paired = summary["paired"]["synthetic-test"]
    assert list(paired) == ["base->sft", "sft->dpo", "dpo->dpo-r2", "base->dpo-r2", "sft->dpo-r2"]
    assert manifest["inputs"]["dpo-r2"]["uri"] == uri("dpo", 2)
    report = (path / "report.md").read_text()
    assert "| dpo-r2 |" in report and "| dpo -> dpo-r2 |" in report
    # The run report too: round 2's phases before eval, its DPO curves, its accuracy and flips.
    run_report = (store / "runs" / run_id / "report.md").read_text()
    phase_lines = [line for line in run_report.splitlines() if line.startswith("| ") and " | " in line[2:]]
    assert [line.split(" | ")[0][2:] for line in phase_lines[1:9]] == [
        "sft", "rollouts", "preferences", "dpo", "round-2/rollouts", "round-2/preferences", "round-2/dpo", "eval"]
    assert "pairs (" in phase_lines[6] and "step-0 loss" in phase_lines[7]  # key numbers as round 1's
    assert "DPO round 2" in phase_lines[8]
    page = (store / "runs" / run_id / "report.html").read_text()
    accuracy = summary["results"]["synthetic-test"]["dpo-r2"]["accuracy"]
    assert f'data-metric="synthetic-test/dpo-r2/accuracy">{100 * accuracy:.1f}%' in page
    assert 'data-plot="dpo-r2-curves"' in page and "DPO → DPO round 2</b>" in page
