"""The embedded pipeline end to end through S3 (moto's server on 127.0.0.1, real boto3 over HTTP).

    python -m pytest tests/test_pipeline_s3.py -q        # ~2-3 minutes on 2 CPU cores

One run, made the way an interrupted run is finished: `pipeline --to preferences`
(as if the job died after preferences), then `pipeline --from dpo`. Then a plain rerun
must skip every phase, a `--force`d DPO must make the next plain run redo only eval, and
a corrupted input must stop the next phase with exit code 3.
The base model is the suite's tiny model (tests/conftest.py), published into the bucket as the `base`
artifact, so every phase reads and writes only S3, and the lineage reaches it.
"""

from __future__ import annotations

import json

import pytest

from app import artifacts
from app.cli import main as cli_main
from app.phases import PHASES
from tests.conftest import SMALL_RUN_FLAGS
from tests.s3_server import moto_endpoint, new_bucket, point_at, raw_client  # noqa: F401

RUN_ID = "s3-demo"


def pipeline_flags(store: str, base_uri: str) -> list[str]:
    flags = ["--store", store, "--run-id", RUN_ID, "--base-model", base_uri]
    seen = set()
    for phase in PHASES:  # the pipeline takes every phase's flags; the small-run settings from conftest
        for flag, value in zip(SMALL_RUN_FLAGS[phase][::2], SMALL_RUN_FLAGS[phase][1::2]):
            if flag not in seen:
                seen.add(flag)
                flags += [flag, value]
    return flags


def digests(store: str) -> dict[str, str | None]:
    out = {}
    for phase in PHASES:
        manifest = artifacts.read_manifest(artifacts.phase_uri(store, RUN_ID, phase))
        out[phase] = artifacts.manifest_digest(manifest) if manifest else None
    return out


@pytest.fixture(scope="module")
def s3_run(moto_endpoint, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """(store, flags, digests after the first invocation, digests after the resume, exit codes)."""
    tmp = tmp_path_factory.mktemp("pipeline-s3")
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp.setenv, mp.delenv, moto_endpoint, tmp)
        mp.setenv("PIPELINE_CACHE", str(tmp / "cache"))
        mp.setenv("PIPELINE_WORKDIR", str(tmp / "work"))
        bucket = new_bucket(moto_endpoint)
        store = f"s3://{bucket}/gsm8k"
        base_uri = artifacts.phase_uri(store, RUN_ID, "base")
        artifacts.publish(tiny_model_dir, base_uri, phase="base", config={"base_model": "tiny"})
        flags = pipeline_flags(store, base_uri)

        first = cli_main(["pipeline", *flags, "--to", "preferences"])
        after_first = digests(store)
        resumed = cli_main(["pipeline", *flags, "--from", "dpo"])
        after_resume = digests(store)
        yield {"store": store, "bucket": bucket, "flags": flags, "base_uri": base_uri, "codes": (first, resumed),
               "after_first": after_first, "after_resume": after_resume, "client": raw_client(moto_endpoint)}


@pytest.fixture
def s3_env(s3_run, moto_endpoint, monkeypatch, tmp_path):  # noqa: F811
    point_at(monkeypatch.setenv, monkeypatch.delenv, moto_endpoint, tmp_path)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    return s3_run


def test_pipeline_runs_every_phase_through_s3(s3_env):
    store = s3_env["store"]
    assert s3_env["codes"] == (0, 0)
    assert all(s3_env["after_resume"][phase] for phase in PHASES)
    keys = [item["Key"] for item in s3_env["client"].list_objects_v2(Bucket=s3_env["bucket"])["Contents"]]
    for phase in ("base", *PHASES):
        assert f"gsm8k/runs/{RUN_ID}/{phase}/manifest.json" in keys
    assert all(key.startswith(f"gsm8k/runs/{RUN_ID}/") for key in keys)

    # The DPO adapter traces back through preferences, rollouts and SFT to the base model, all in S3.
    rows = [row for row in artifacts.trace(artifacts.phase_uri(store, RUN_ID, "dpo")) if "uri" in row]
    assert {row["phase"] for row in rows} >= {"dpo", "preferences", "rollouts", "sft", "base"}
    assert all(row["status"] == "ok" and row["uri"].startswith("s3://") for row in rows)

    root, manifest = artifacts.fetch(artifacts.phase_uri(store, RUN_ID, "eval"))
    assert manifest["metrics"] and (root / "report.md").exists()
    report = s3_env["client"].get_object(Bucket=s3_env["bucket"], Key=f"gsm8k/runs/{RUN_ID}/report.md")
    assert report["Body"].read().strip()


def test_from_resumes_without_redoing_earlier_phases(s3_env):
    first, resumed = s3_env["after_first"], s3_env["after_resume"]
    assert first["dpo"] is None and first["eval"] is None  # the first invocation stopped after preferences
    for phase in ("sft", "rollouts", "preferences"):
        assert resumed[phase] == first[phase], f"{phase} was republished by --from dpo"


def test_rerun_skips_every_phase(s3_env):
    before = digests(s3_env["store"])
    assert cli_main(["pipeline", *s3_env["flags"]]) == 0
    # Nothing was republished (a phase that redid its work could not publish over the same config
    # without --force, and would have failed the run).
    assert digests(s3_env["store"]) == before


def phase_flags(s3_env, phase: str) -> list[str]:
    return ["--store", s3_env["store"], "--run-id", RUN_ID, "--base-model", s3_env["base_uri"], *SMALL_RUN_FLAGS[phase]]


def test_a_forced_phase_makes_the_next_run_redo_only_what_depends_on_it(s3_env):
    before = digests(s3_env["store"])
    assert cli_main(["dpo", *phase_flags(s3_env, "dpo"), "--force"]) == 0
    assert cli_main(["pipeline", *s3_env["flags"]]) == 0  # no --force: eval is stale and is redone
    after = digests(s3_env["store"])
    assert {phase for phase in PHASES if after[phase] != before[phase]} == {"dpo", "eval"}
    eval_inputs = artifacts.read_manifest(artifacts.phase_uri(s3_env["store"], RUN_ID, "eval"))["inputs"]
    assert after["dpo"] in json.dumps(eval_inputs)


def test_corrupted_input_stops_the_next_phase_with_exit_code_3(s3_env, capfd):
    store, client, bucket = s3_env["store"], s3_env["client"], s3_env["bucket"]
    uri = artifacts.phase_uri(store, RUN_ID, "preferences")
    manifest = artifacts.read_manifest(uri)
    name = sorted(manifest["files"])[0]
    key = f"gsm8k/runs/{RUN_ID}/preferences/{manifest['data_dir']}/{name}"
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=original + b"\n")
    dpo_before = digests(store)["dpo"]
    try:
        assert cli_main(["dpo", *phase_flags(s3_env, "dpo"), "--force"]) == 3
        err = capfd.readouterr().err
        assert f"{name}: size" in err and "does not match the manifest" in err
        assert digests(store)["dpo"] == dpo_before  # the published DPO adapter was not touched
    finally:
        client.put_object(Bucket=bucket, Key=key, Body=original)
    json.loads(client.get_object(Bucket=bucket, Key=f"gsm8k/runs/{RUN_ID}/dpo/manifest.json")["Body"].read())
