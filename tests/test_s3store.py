"""The artifact contract through S3: a real moto S3 server on 127.0.0.1, real boto3 over HTTP.

    python -m pytest tests/test_s3store.py -q

The code under test is configured only through AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_REGION, as in a pod. Faults are real too: connections are cut
by a TCP proxy, a writer process is SIGKILLed, objects are overwritten behind our back,
and moto checks signatures and IAM policies for the credential tests.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from app import artifacts
from app.errors import ConfigError, InputError, StorageError
from app.s3store import S3Backend
from tests.s3_server import (FlakyProxy, free_port, iam_authentication, iam_user, interrupted_dir,  # noqa: F401
                             kill_publish_midway, moto_endpoint, publish_concurrently, s3)


def make_outputs(root: Path, text: str = "hello", files: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "text": text}))
    (root / "weights").mkdir(exist_ok=True)
    for i in range(files - 1):
        (root / "weights" / f"part-{i:03d}.bin").write_bytes(f"{text} {i} ".encode() * 2000)
    return root


# ---------------------------------------------------------------------------------------------
# Publish and fetch


def test_publish_and_fetch_through_s3(tmp_path, s3):
    outputs = make_outputs(tmp_path / "work", files=4)
    uri = artifacts.phase_uri(s3.store, "run-1", "sft")
    assert uri == f"s3://{s3.bucket}/proj/runs/run-1/sft"
    artifacts.check_store(s3.store)
    manifest = artifacts.publish(outputs, uri, phase="sft", config={"lr": 1e-4}, metrics={"loss": 0.3})

    # Exactly the manifest and the files it names are in the bucket, under the attempt directory.
    prefix = "proj/runs/run-1/sft/"
    assert s3.keys(prefix) == sorted([prefix + "manifest.json"] +
                                     [f"{prefix}{manifest['data_dir']}/{name}" for name in manifest["files"]])
    root, fetched = artifacts.fetch(uri)
    assert fetched == manifest
    for name in manifest["files"]:
        assert (root / name).read_bytes() == (outputs / name).read_bytes()
    assert root.is_relative_to(Path(os.environ["PIPELINE_CACHE"]))
    assert artifacts.is_current(uri, {"lr": 1e-4}) and not artifacts.is_current(uri, {"lr": 2e-4})


def test_fetch_reuses_its_verified_cache_and_repairs_a_damaged_copy(tmp_path, s3):
    uri = artifacts.phase_uri(s3.store, "run-1", "sft")
    artifacts.publish(make_outputs(tmp_path / "work"), uri, phase="sft", config={})
    root, _ = artifacts.fetch(uri)
    cached = root / "weights" / "part-000.bin"
    before = cached.stat().st_mtime_ns
    assert artifacts.fetch(uri)[0] == root and cached.stat().st_mtime_ns == before  # no second download

    good = cached.read_bytes()
    cached.write_bytes(b"x" * len(good))  # the local copy rots (same size)
    root_again, _ = artifacts.fetch(uri)
    assert (root_again / "weights" / "part-000.bin").read_bytes() == good


@pytest.mark.parametrize("damage, message", [
    ("flip", "SHA-256 does not match"),
    ("truncate", "does not match the manifest's"),
    ("delete", "listed in the manifest but missing"),
])
def test_corrupted_object_is_detected(tmp_path, s3, damage, message):
    uri = artifacts.phase_uri(s3.store, "run-1", "rollouts")
    manifest = artifacts.publish(make_outputs(tmp_path / "work"), uri, phase="rollouts", config={})
    key = f"proj/runs/run-1/rollouts/{manifest['data_dir']}/weights/part-000.bin"
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    if damage == "flip":
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    elif damage == "truncate":
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body[:100])
    else:
        s3.client.delete_object(Bucket=s3.bucket, Key=key)

    with pytest.raises(InputError, match=message) as error:
        artifacts.fetch(uri, cache_dir=tmp_path / "fresh-cache")
    assert "weights/part-000.bin" in str(error.value)
    assert not list((tmp_path / "fresh-cache" / "artifacts").glob("*/weights/part-000.bin"))  # bad bytes not kept


def test_tampered_manifest_is_refused(tmp_path, s3):
    uri = artifacts.phase_uri(s3.store, "run-1", "sft")
    artifacts.publish(make_outputs(tmp_path / "work"), uri, phase="sft", config={})
    s3.client.put_object(Bucket=s3.bucket, Key="proj/runs/run-1/sft/manifest.json", Body=b'{"files": ')
    with pytest.raises(InputError, match="not valid JSON"):
        artifacts.read_manifest(uri)


def test_large_file_goes_multipart_with_a_progress_bar(tmp_path, s3, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_S3_MULTIPART_MB", "5")  # the S3 minimum part size
    outputs = tmp_path / "work"
    outputs.mkdir()
    (outputs / "model.safetensors").write_bytes(os.urandom(11 << 20))
    uri = artifacts.phase_uri(s3.store, "run-1", "base")
    manifest = artifacts.publish(outputs, uri, phase="base", config={})

    head = s3.client.head_object(Bucket=s3.bucket,
                                 Key=f"proj/runs/run-1/base/{manifest['data_dir']}/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # an 11 MiB file in 5 MiB parts: a 3-part multipart upload
    root, _ = artifacts.fetch(uri)
    assert artifacts.sha256_file(root / "model.safetensors") == manifest["files"]["model.safetensors"]["sha256"]
    err = capsys.readouterr().err
    assert "upload model.safetensors" in err and "download model.safetensors" in err and "100%" in err


def test_local_copy_downloads_a_data_file_once_and_again_when_it_changes(tmp_path, s3):
    uri = f"s3://{s3.bucket}/gsm8k/train.jsonl"
    s3.client.put_object(Bucket=s3.bucket, Key="gsm8k/train.jsonl", Body=b'{"question": "q", "answer": "#### 1"}\n')
    path = artifacts.local_copy(uri)
    assert path.name == "train.jsonl" and path.read_bytes().endswith(b"#### 1\"}\n")
    stamp = path.stat().st_mtime_ns
    assert artifacts.local_copy(uri) == path and path.stat().st_mtime_ns == stamp

    s3.client.put_object(Bucket=s3.bucket, Key="gsm8k/train.jsonl", Body=b'{"question": "q", "answer": "#### 22"}\n')
    assert b"#### 22" in artifacts.local_copy(uri).read_bytes()
    with pytest.raises(InputError, match="no such object"):
        artifacts.local_copy(f"s3://{s3.bucket}/gsm8k/absent.jsonl")


# ---------------------------------------------------------------------------------------------
# Atomic publish, races, reruns


def test_interrupted_upload_is_never_seen_as_complete(tmp_path, s3):
    uri = artifacts.phase_uri(s3.store, "run-1", "sft")
    outputs = interrupted_dir(tmp_path / "work")
    prefix = "proj/runs/run-1/sft/"

    def some_objects_landed() -> bool:
        return any(key.endswith("/a.json") for key in s3.keys(prefix))

    kill_publish_midway(outputs, uri, some_objects_landed)

    assert prefix + "manifest.json" not in s3.keys(prefix)
    assert artifacts.read_manifest(uri) is None and not artifacts.is_current(uri, {})
    with pytest.raises(InputError, match="not published"):
        artifacts.fetch(uri)
    (outputs / "z.bin").write_bytes(b"small now")
    artifacts.publish(outputs, uri, phase="sft", config={})
    root, _ = artifacts.fetch(uri)
    assert (root / "z.bin").read_bytes() == b"small now"


def test_conditional_write_is_honoured_by_the_server(s3):
    backend, prefix = artifacts.open_store(s3.store)
    assert isinstance(backend, S3Backend) and prefix == "proj"
    assert backend.write_bytes("proj/x/manifest.json", b"first", if_absent=True)
    assert not backend.write_bytes("proj/x/manifest.json", b"second", if_absent=True)
    assert backend.conditional_writes is True  # moto answers If-None-Match: * with 412, as AWS and MinIO do
    assert backend.read_bytes("proj/x/manifest.json") == b"first"


def test_two_concurrent_writers_one_wins_and_its_files_stay_intact(tmp_path, s3):
    uri = artifacts.phase_uri(s3.store, "race", "rollouts")
    dirs = [make_outputs(tmp_path / f"w{i}", text=f"writer {i}", files=6) for i in range(2)]
    results = publish_concurrently(dirs, uri, phase="rollouts", config={"same": True})

    winners = [i for i, result in enumerate(results) if isinstance(result, dict)]
    assert len(winners) == 1, results
    assert "another writer" in str(results[1 - winners[0]])
    root, manifest = artifacts.fetch(uri)
    assert (root / "adapter_config.json").read_text() == (dirs[winners[0]] / "adapter_config.json").read_text()
    # The loser removed what it uploaded: only the winner's attempt is left.
    assert {key.split("/")[4] for key in s3.keys("proj/runs/race/rollouts/")} == {"manifest.json",
                                                                                  manifest["data_dir"]}


def test_rerun_and_force_through_s3(tmp_path, s3):
    uri = artifacts.phase_uri(s3.store, "run-1", "preferences")
    first = artifacts.publish(make_outputs(tmp_path / "a", "one"), uri, phase="preferences", config={"t": 0.5})
    assert artifacts.is_current(uri, {"t": 0.5})
    with pytest.raises(ConfigError, match="--force"):
        artifacts.publish(make_outputs(tmp_path / "b", "two"), uri, phase="preferences", config={"t": 0.7})
    second = artifacts.publish(make_outputs(tmp_path / "b", "two"), uri, phase="preferences", config={"t": 0.7},
                               overwrite=True)
    assert artifacts.is_current(uri, {"t": 0.7}) and not artifacts.is_current(uri, {"t": 0.5})
    keys = s3.keys("proj/runs/run-1/preferences/")
    assert not any(first["data_dir"] in key for key in keys)  # the replaced attempt was deleted
    assert all(second["data_dir"] in key or key.endswith("manifest.json") for key in keys)


def test_lineage_traces_a_dpo_adapter_to_its_inputs_through_s3(tmp_path, s3):
    def step(phase: str, **inputs: str) -> dict:
        uri = artifacts.phase_uri(s3.store, "run-1", phase)
        entries = {name: artifacts.lineage_entry(src, artifacts.read_manifest(src)) for name, src in inputs.items()}
        return artifacts.publish(make_outputs(tmp_path / phase), uri, phase=phase, config={}, inputs=entries)

    uri = lambda phase: artifacts.phase_uri(s3.store, "run-1", phase)  # noqa: E731
    step("base")
    step("sft", base_model=uri("base"))
    step("rollouts", policy=uri("sft"))
    step("preferences", rollouts=uri("rollouts"))
    step("dpo", sft=uri("sft"), preferences=uri("preferences"))

    phases = [(row["depth"], row["input"], row["phase"]) for row in artifacts.trace(uri("dpo"))]
    assert phases == [(0, None, "dpo"), (1, "preferences", "preferences"), (2, "rollouts", "rollouts"),
                      (3, "policy", "sft"), (4, "base_model", "base"), (1, "sft", "sft"), (2, "base_model", "base")]


# ---------------------------------------------------------------------------------------------
# Faults: flaky network, unreachable endpoint, missing bucket, credentials, permissions


@pytest.fixture
def proxy(moto_endpoint):
    flaky = FlakyProxy(moto_endpoint)
    yield flaky
    flaky.close()


def test_upload_survives_a_short_outage(tmp_path, s3, proxy, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # so botocore gives up inside the outage and our retry matters
    outputs = make_outputs(tmp_path / "work", files=12)  # ~12 x 20 kB
    uri = artifacts.phase_uri(s3.store, "run-1", "sft")
    proxy.cut_after(60_000, outage_s=2.5)

    manifest = artifacts.publish(outputs, uri, phase="sft", config={})
    assert proxy.bytes_up > 60_000
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # read back directly from the server
    root, _ = artifacts.fetch(uri)
    assert {name: artifacts.sha256_file(root / name) for name in manifest["files"]} == \
        {name: meta["sha256"] for name, meta in manifest["files"].items()}
    assert "retrying" in capsys.readouterr().err


def test_failed_upload_never_leaves_a_manifest(tmp_path, s3, proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    outputs = make_outputs(tmp_path / "work", files=12)
    uri = artifacts.phase_uri(s3.store, "run-1", "sft")
    proxy.cut_after(60_000, outage_s=None)  # the endpoint goes away for good mid-publish

    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {proxy.url}"):
        artifacts.publish(outputs, uri, phase="sft", config={})
    assert time.monotonic() - started < 60
    assert any("/attempt-" in key for key in s3.keys("proj/runs/run-1/sft/"))  # some files did land
    assert "proj/runs/run-1/sft/manifest.json" not in s3.keys("proj/runs/run-1/sft/")

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert artifacts.read_manifest(uri) is None
    artifacts.publish(outputs, uri, phase="sft", config={})  # and a retry of the phase publishes normally
    assert artifacts.fetch(uri)[1]["files"].keys() == {p.relative_to(outputs).as_posix()
                                                        for p in outputs.rglob("*") if p.is_file()}


def test_missing_bucket_fails_fast_naming_the_bucket(s3):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket-here' does not exist"):
        artifacts.check_store("s3://no-such-bucket-here/proj")


def test_unreachable_endpoint_fails_fast_naming_the_endpoint(s3, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {dead}"):
        artifacts.check_store(s3.store)
    assert time.monotonic() - started < 15


def test_no_credentials_at_all_is_a_config_error(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="no usable S3 credentials"):
        artifacts.check_store(s3.store)


def test_malformed_store_uri(s3):
    with pytest.raises(ConfigError, match="no bucket name"):
        artifacts.check_store("s3:///proj")


POLICY = {  # the policy docs/STORAGE.md recommends, for bucket `{bucket}` and prefix `proj/`
    "Version": "2012-10-17",
    "Statement": [
        # AWS authorises HeadBucket with s3:ListBucket; moto checks an action it calls s3:HeadBucket.
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:HeadBucket"], "Resource": "arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": "arn:aws:s3:::{bucket}/proj/*"},
    ],
}


def policy_for(bucket: str, drop_list: bool = False) -> dict:
    policy = json.loads(json.dumps(POLICY).replace("{bucket}", bucket))
    if drop_list:
        policy["Statement"] = policy["Statement"][1:]
    return policy


def test_with_iam_checks_on(tmp_path, s3, monkeypatch):
    """Bad credentials, a missing s3:ListBucket, and the documented least-privilege policy at work."""
    good = iam_user(s3.endpoint, policy_for(s3.bucket))
    no_list = iam_user(s3.endpoint, policy_for(s3.bucket, drop_list=True))
    outputs = make_outputs(tmp_path / "work")
    uri = artifacts.phase_uri(s3.store, "run-1", "sft")

    def use(key: tuple[str, str]) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key[1])

    with iam_authentication(s3.endpoint):
        use(("AKIAIOSFODNN7EXAMPLE", "wrong"))
        with pytest.raises(ConfigError, match="rejected the credentials .InvalidAccessKeyId"):
            artifacts.check_store(s3.store)
        use((good[0], "wrong-secret"))
        with pytest.raises(ConfigError, match="rejected the credentials .SignatureDoesNotMatch"):
            artifacts.check_store(s3.store)

        use(no_list)
        with pytest.raises(ConfigError, match="lack s3:ListBucket"):
            artifacts.check_store(s3.store)
        # Nothing else needs it (moto answers 404 for a missing key even so; AWS would say 403, which is why
        # the documented policy grants ListBucket): publish, fetch and the rerun check never list a prefix.
        assert artifacts.read_manifest(uri) is None
        artifacts.publish(outputs, uri, phase="sft", config={})
        assert artifacts.is_current(uri, {})
        assert artifacts.fetch(uri)[1]["files"]

        use(good)
        artifacts.check_store(s3.store)
        artifacts.publish(outputs, uri, phase="sft", config={"v": 2}, overwrite=True)
        assert artifacts.is_current(uri, {"v": 2})
        with pytest.raises(ConfigError, match="access denied to write"):
            artifacts.check_store(f"s3://{s3.bucket}/elsewhere")


def test_a_phase_stops_before_loading_anything_when_the_store_is_unusable(s3, monkeypatch, capfd):
    from app.cli import main as cli_main

    started = time.monotonic()
    assert cli_main(["sft", "--store", "s3://no-such-bucket-here/gsm8k", "--run-id", "x"]) == 2
    assert "error: bucket 'no-such-bucket-here' does not exist" in capfd.readouterr().err

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    assert cli_main(["pipeline", "--store", s3.store, "--run-id", "x"]) == 1
    assert f"error: cannot reach the S3 endpoint {dead}" in capfd.readouterr().err
    assert time.monotonic() - started < 30


def test_an_endpoint_that_is_no_s3_server_is_called_out(s3, monkeypatch):
    """A proxy or web server answering 404 with no S3 error must not pass for a missing bucket."""
    import http.server

    class NotS3(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ConfigError, match="answered 404 without an S3 error code"):
            artifacts.check_store(s3.store)
    finally:
        server.shutdown()


def test_a_store_without_conditional_writes_falls_back_safely(tmp_path, s3, monkeypatch, capsys):
    from tests.s3_server import NoConditionalWritesProxy

    proxy = NoConditionalWritesProxy(s3.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        artifacts.check_store(s3.store)
        assert "does not support conditional writes" in capsys.readouterr().err
        backend, _ = artifacts.open_store(s3.store)
        assert backend.conditional_writes is False and proxy.refused == 1

        # Check-then-write still refuses a second publish of the same artifact...
        uri = artifacts.phase_uri(s3.store, "run-1", "sft")
        artifacts.publish(make_outputs(tmp_path / "a", "one"), uri, phase="sft", config={})
        with pytest.raises(StorageError, match="another writer"):
            artifacts.publish(make_outputs(tmp_path / "b", "two"), uri, phase="sft", config={})

        # ...and in a race, whatever manifest ends up in place names a complete, consistent attempt.
        race = artifacts.phase_uri(s3.store, "race", "sft")
        dirs = [make_outputs(tmp_path / f"w{i}", text=f"writer {i}", files=6) for i in range(3)]
        results = publish_concurrently(dirs, race, phase="sft", config={})
        root, manifest = artifacts.fetch(race)  # every checksum holds
        assert manifest in results
        writer = results.index(manifest)
        assert (root / "adapter_config.json").read_text() == (dirs[writer] / "adapter_config.json").read_text()
        assert proxy.refused == 1  # the server was asked once; after that the store knew
    finally:
        proxy.close()
