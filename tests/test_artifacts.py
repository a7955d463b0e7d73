"""The artifact contract on the local-directory store: manifest written last, checksums, races, reruns.

    python -m pytest tests/test_artifacts.py -q

The same functions serve S3 (tests/test_s3store.py runs the S3 side against a real server).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app import artifacts
from app.errors import ConfigError, InputError, StorageError
from tests.s3_server import interrupted_dir, kill_publish_midway, publish_concurrently


def make_outputs(root: Path, text: str = "hello") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "text": text}))
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "adapter.bin").write_bytes(text.encode() * 1000)
    return root


@pytest.fixture
def store(tmp_path) -> str:
    return str(tmp_path / "store")


def test_publish_then_fetch_gives_every_file_back_verified(tmp_path, store):
    outputs = make_outputs(tmp_path / "work")
    uri = artifacts.phase_uri(store, "run-1", "sft")
    manifest = artifacts.publish(outputs, uri, phase="sft", config={"lr": 1e-4}, metrics={"loss": 0.5},
                                 timings={"train_s": 12.0})

    root, fetched = artifacts.fetch(uri)
    assert fetched == manifest
    assert sorted(manifest["files"]) == ["adapter_config.json", "weights/adapter.bin"]
    for name in manifest["files"]:
        assert (root / name).read_bytes() == (outputs / name).read_bytes()
    assert manifest["files"]["weights/adapter.bin"]["size"] == 5000
    assert manifest["files"]["weights/adapter.bin"]["sha256"] == artifacts.sha256_file(outputs / "weights/adapter.bin")
    assert manifest["metrics"] == {"loss": 0.5}
    assert manifest["timings"]["train_s"] == 12.0 and manifest["timings"]["publish_s"] >= 0
    assert manifest["code_version"].startswith("0.")
    assert manifest["config"] == {"lr": 1e-4} and manifest["phase"] == "sft"
    # Files live in the attempt directory the manifest names, the manifest next to it.
    assert root == Path(uri) / manifest["data_dir"] and manifest["data_dir"].startswith("attempt-")
    assert (Path(uri) / "manifest.json").exists()


def test_unpublished_artifact_is_refused_with_a_clear_error(store):
    uri = artifacts.phase_uri(store, "run-1", "rollouts")
    assert artifacts.read_manifest(uri) is None
    assert not artifacts.is_current(uri, {})
    with pytest.raises(InputError, match="not published"):
        artifacts.fetch(uri)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes().replace(b"h", b"j")), "SHA-256 does not match"),
    (lambda path: path.write_bytes(path.read_bytes()[:-10]), "size 4990 does not match"),
    (lambda path: path.unlink(), "listed in the manifest but missing"),
])
def test_tampered_or_truncated_file_is_refused(tmp_path, store, damage, message):
    uri = artifacts.phase_uri(store, "run-1", "sft")
    manifest = artifacts.publish(make_outputs(tmp_path / "work"), uri, phase="sft", config={})
    damage(Path(uri) / manifest["data_dir"] / "weights" / "adapter.bin")
    with pytest.raises(InputError, match=message) as error:
        artifacts.fetch(uri)
    assert "weights/adapter.bin" in str(error.value)


def test_damaged_manifest_is_refused(tmp_path, store):
    uri = artifacts.phase_uri(store, "run-1", "sft")
    artifacts.publish(make_outputs(tmp_path / "work"), uri, phase="sft", config={})
    manifest_path = Path(uri) / "manifest.json"
    text = manifest_path.read_text()

    manifest_path.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="not valid JSON"):
        artifacts.fetch(uri)

    # A manifest edited to point outside the artifact must not make fetch touch other paths.
    evil = json.loads(text)
    evil["files"] = {"../../../etc/passwd": {"size": 1, "sha256": "0" * 64}}
    manifest_path.write_text(json.dumps(evil))
    with pytest.raises(InputError, match="unsafe file name"):
        artifacts.fetch(uri)


def test_interrupted_publish_is_never_seen_as_complete(tmp_path, store):
    uri = artifacts.phase_uri(store, "run-1", "sft")
    outputs = interrupted_dir(tmp_path / "work")

    def some_files_landed() -> bool:
        return any(Path(uri).glob("attempt-*/a.json"))

    kill_publish_midway(outputs, uri, some_files_landed)

    assert any(Path(uri).glob("attempt-*/a.json")), "the killed writer left files behind"
    assert artifacts.read_manifest(uri) is None
    assert not artifacts.is_current(uri, {})
    with pytest.raises(InputError, match="not published"):
        artifacts.fetch(uri)
    # The leftovers do not block a rerun, which publishes a complete artifact.
    (outputs / "z.bin").write_bytes(b"small now")
    manifest = artifacts.publish(outputs, uri, phase="sft", config={})
    root, _ = artifacts.fetch(uri)
    assert (root / "z.bin").read_bytes() == b"small now" and set(manifest["files"]) == {"a.json", "b.txt", "z.bin"}


def test_two_concurrent_writers_one_wins_and_its_files_stay_intact(tmp_path, store):
    for round_ in range(4):
        uri = artifacts.phase_uri(store, f"race-{round_}", "sft")
        dirs = [make_outputs(tmp_path / f"w{round_}-{i}", text=f"writer {i} " * 50) for i in range(2)]
        results = publish_concurrently(dirs, uri, phase="sft", config={"same": True})

        winners = [i for i, result in enumerate(results) if isinstance(result, dict)]
        assert len(winners) == 1, results
        loser = results[1 - winners[0]]
        assert "another writer" in str(loser)
        root, manifest = artifacts.fetch(uri)  # checksums hold: the loser touched none of the winner's files
        assert manifest == results[winners[0]]
        assert (root / "weights/adapter.bin").read_bytes() == (dirs[winners[0]] / "weights/adapter.bin").read_bytes()
        assert sorted(p.name for p in Path(uri).iterdir()) == sorted([manifest["data_dir"], "manifest.json"])


def test_rerun_rules_same_config_different_config_and_force(tmp_path, store):
    uri = artifacts.phase_uri(store, "run-1", "dpo")
    first = artifacts.publish(make_outputs(tmp_path / "a", "one"), uri, phase="dpo", config={"beta": 0.1},
                              identity={"beta": 0.1, "seed": 0})
    assert artifacts.is_current(uri, {"beta": 0.1, "seed": 0})
    assert not artifacts.is_current(uri, {"beta": 0.2, "seed": 0})

    with pytest.raises(StorageError, match="same config"):
        artifacts.publish(make_outputs(tmp_path / "b", "two"), uri, phase="dpo", config={"beta": 0.1},
                          identity={"beta": 0.1, "seed": 0})
    with pytest.raises(ConfigError, match="--force"):
        artifacts.publish(make_outputs(tmp_path / "b", "two"), uri, phase="dpo", config={"beta": 0.2},
                          identity={"beta": 0.2, "seed": 0})

    second = artifacts.publish(make_outputs(tmp_path / "b", "two"), uri, phase="dpo", config={"beta": 0.2},
                               identity={"beta": 0.2, "seed": 0}, overwrite=True)
    assert artifacts.is_current(uri, {"beta": 0.2, "seed": 0})
    root, _ = artifacts.fetch(uri)
    assert "two" in (root / "adapter_config.json").read_text()
    # The replaced attempt's files are gone; only the new attempt and its manifest remain.
    assert not (Path(uri) / first["data_dir"]).exists()
    assert sorted(p.name for p in Path(uri).iterdir()) == sorted([second["data_dir"], "manifest.json"])


def test_trace_follows_inputs_and_flags_a_replaced_input(tmp_path, store):
    base = artifacts.phase_uri(store, "run-1", "base")
    sft = artifacts.phase_uri(store, "run-1", "sft")
    dpo = artifacts.phase_uri(store, "run-1", "dpo")
    base_m = artifacts.publish(make_outputs(tmp_path / "base"), base, phase="base", config={})
    sft_m = artifacts.publish(make_outputs(tmp_path / "sft"), sft, phase="sft", config={},
                              inputs={"base_model": artifacts.lineage_entry(base, base_m), "train_data": "synthetic:8"})
    artifacts.publish(make_outputs(tmp_path / "dpo"), dpo, phase="dpo", config={},
                      inputs={"sft": artifacts.lineage_entry(sft, sft_m)})

    rows = artifacts.trace(dpo)
    assert [(row["depth"], row.get("phase"), row.get("status")) for row in rows if "uri" in row] == [
        (0, "dpo", "ok"), (1, "sft", "ok"), (2, "base", "ok")]
    assert {"depth": 2, "input": "train_data", "value": "synthetic:8"} in rows

    artifacts.publish(make_outputs(tmp_path / "sft2", "new"), sft, phase="sft", config={"v": 2}, overwrite=True)
    statuses = {row["phase"]: row["status"] for row in artifacts.trace(dpo) if "uri" in row}
    assert statuses == {"dpo": "ok", "sft": "replaced"}


def test_write_if_absent_is_atomic_create(tmp_path):
    backend = artifacts.LocalBackend(tmp_path)
    assert backend.write_bytes("x/manifest.json", b"first", if_absent=True)
    assert not backend.write_bytes("x/manifest.json", b"second", if_absent=True)
    assert (tmp_path / "x/manifest.json").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["manifest.json"]  # no temporary files left


def test_local_copy_of_a_plain_local_file(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    assert artifacts.local_copy(str(data)) == data
    with pytest.raises(InputError, match="no such file"):
        artifacts.local_copy(str(tmp_path / "absent.jsonl"))


def test_check_store_creates_a_local_store(tmp_path):
    artifacts.check_store(str(tmp_path / "new" / "store"))
    assert (tmp_path / "new" / "store").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot create store directory"):
        artifacts.check_store(str(tmp_path / "file" / "store"))


def test_workdir_is_private_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WORKDIR", str(tmp_path))
    with artifacts.workdir("sft") as work:
        (work / "f").write_text("x")
        assert work.parent == tmp_path and work.name.startswith("sft-")
    assert not work.exists()
    assert os.listdir(tmp_path) == []


def test_an_artifact_built_from_a_replaced_input_is_stale_and_replaced_without_force(tmp_path, store):
    sft = artifacts.phase_uri(store, "run-1", "sft")
    rollouts = artifacts.phase_uri(store, "run-1", "rollouts")
    sft_v1 = artifacts.publish(make_outputs(tmp_path / "sft1", "v1"), sft, phase="sft", config={})
    artifacts.publish(make_outputs(tmp_path / "r1"), rollouts, phase="rollouts", config={"n": 8},
                      inputs={"policy": artifacts.lineage_entry(sft, sft_v1)})
    assert artifacts.is_current(rollouts, {"n": 8})

    sft_v2 = artifacts.publish(make_outputs(tmp_path / "sft2", "v2"), sft, phase="sft", config={}, overwrite=True)
    assert not artifacts.is_current(rollouts, {"n": 8})  # its policy was republished
    redone = artifacts.publish(make_outputs(tmp_path / "r2", "redone"), rollouts, phase="rollouts", config={"n": 8},
                               inputs={"policy": artifacts.lineage_entry(sft, sft_v2)})
    assert artifacts.is_current(rollouts, {"n": 8})
    assert "redone" in (artifacts.fetch(rollouts)[0] / "adapter_config.json").read_text()
    # A second writer with the very same inputs is a duplicate, not a replacement.
    with pytest.raises(StorageError, match="another writer"):
        artifacts.publish(make_outputs(tmp_path / "r3", "dup"), rollouts, phase="rollouts", config={"n": 8},
                          inputs={"policy": artifacts.lineage_entry(sft, sft_v2)})
    assert artifacts.read_manifest(rollouts) == redone


def test_the_lineage_command_prints_the_tree_and_flags_a_replaced_input(tmp_path, store, capsys):
    from app.cli import main

    sft = artifacts.phase_uri(store, "run-1", "sft")
    dpo = artifacts.phase_uri(store, "run-1", "dpo")
    sft_m = artifacts.publish(make_outputs(tmp_path / "sft"), sft, phase="sft", config={},
                              inputs={"train_data": {"spec": "synthetic:8"}})
    artifacts.publish(make_outputs(tmp_path / "dpo"), dpo, phase="dpo", config={},
                      inputs={"sft": artifacts.lineage_entry(sft, sft_m)})
    argv = ["lineage", "--store", store, "--run-id", "run-1", "--phase", "dpo"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"dpo  ok  {dpo}  created ") and lines[1].startswith(f"  sft: sft  ok  {sft}  ")
    assert lines[2] == "    train_data: {'spec': 'synthetic:8'}"

    artifacts.publish(make_outputs(tmp_path / "sft2", "new"), sft, phase="sft", config={"v": 2}, overwrite=True)
    assert main([*argv, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["depth"], row["phase"], row["status"]) for row in rows] == [(0, "dpo", "ok"), (1, "sft", "replaced")]
    assert main([*argv[:-1], "eval"]) == 3
    assert "runs/run-1/eval is not published" in capsys.readouterr().err
