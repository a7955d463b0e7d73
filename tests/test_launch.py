"""app/launch.py: a phase under torchrun exits with the code the phase chose, not torchrun's 1.

    OMP_NUM_THREADS=1 python -m pytest tests/test_launch.py -q

The real launcher runs the real `sft` with 2 torchrun workers on the CPU. The four exit-code
runs start together in one fixture: each spends most of its few seconds waiting on torchrun's
start-up, so together they take about as long as one. No run needs a model: each ends before
the model would load (bad data, an empty data spec, an artifact already published, a crash).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import artifacts
from app.cli import main as cli_main
from app.cli import parse
from app.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_OK, EXIT_RETRYABLE
from app.launch import exit_code

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def launcher_env(tmp: Path) -> dict[str, str]:
    """This environment without PIPELINE_* (the workers see only the flags), temp files under `tmp`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}


def start(tmp: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.launch", "--nproc-per-node", "2", *argv], cwd=REPO,
                            env=launcher_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """{case: (exit code, output, the launcher's TMPDIR)} for one real launch per case."""
    root = tmp_path_factory.mktemp("launch")
    # A hub model that does not exist (HF_HUB_OFFLINE): had a model been loaded first, the error would be about it.
    store, nowhere = root / "store", "no-such-org/no-such-model"
    bad = root / "bad.jsonl"
    bad.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n{"question": "2 + 2?", "answer": \n')
    broken = root / "broken-model"  # passes the input check (a directory with config.json); loading it crashes
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    common = ["--store", str(store), "--base-model", nowhere]
    cases = {
        "input": ["sft", *common, "--run-id", "bad-data", "--train-data", str(bad)],
        # The parser accepts an empty spec; only the workers' data loader rejects it (ConfigError).
        "config": ["sft", *common, "--run-id", "empty-spec", "--train-data", ""],
        "crash": ["sft", "--store", str(store), "--base-model", str(broken), "--run-id", "crash",
                  "--train-data", "synthetic:8"],
        "done": ["sft", *common, "--run-id", "done", "--train-data", "synthetic:8"],
    }
    # A restarted Job after the phase was published: every rank finds the artifact and exits 0.
    _, config = parse(cases["done"], environ={})
    published = root / "published"
    published.mkdir()
    (published / "adapter_config.json").write_text("{}")
    artifacts.publish(published, artifacts.phase_uri(str(store), "done", "sft"), phase="sft",
                      config=config.to_dict(), identity=config.identity())

    procs = {}
    for case, argv in cases.items():
        (root / case).mkdir()
        procs[case] = (start(root / case, *argv), root / case)
    results = {}
    for case, (proc, tmp) in procs.items():
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        results[case] = (proc.returncode, out, tmp)
    return results


def test_bad_input_data_in_the_workers_exits_3(runs):
    code, err, _ = runs["input"]
    assert code == EXIT_INPUT, err
    assert "bad.jsonl:2: malformed JSON" in err
    assert "launch: torchrun exited 1, a worker 3: exiting 3" in err


def test_a_config_error_only_the_workers_see_exits_2(runs):
    code, err, _ = runs["config"]
    assert code == EXIT_CONFIG, err
    assert "error: empty data spec" in err


def test_a_crash_in_the_workers_keeps_torchruns_code(runs):
    code, err, _ = runs["crash"]
    assert code == EXIT_RETRYABLE, err
    assert "Traceback" in err and "launch:" not in err


def test_success_exits_0(runs):
    code, err, _ = runs["done"]
    assert code == EXIT_OK, err
    assert "already published with this config; nothing to do" in err  # (rank 0 logs)


def test_the_exit_code_file_is_removed(runs):
    for case, (_, _, tmp) in runs.items():
        assert list(tmp.glob("pipeline-exit-codes-*")) == [], case


def test_sigterm_reaches_torchrun_and_its_workers(tmp_path):
    """Preemption: Kubernetes sends SIGTERM to the launcher only; the workers must stop too.
    They block opening a FIFO that no one writes, so only a signal can end them."""
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    model = tmp_path / "model"  # passes the input checks (a directory with a config.json); never loaded
    model.mkdir()
    (model / "config.json").write_text("{}")
    proc = start(tmp_path, "sft", "--store", str(tmp_path / "store"), "--run-id", "sigterm",
                 "--train-data", str(fifo), "--base-model", str(model))
    workers: list[int] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [pid for pid, cmd in processes().items() if str(fifo) in cmd and "-u -m app sft" in cmd]
        assert len(workers) == 2, "torchrun did not start its 2 workers"
        proc.send_signal(signal.SIGTERM)
        err, _ = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_RETRYABLE, err  # the pod is a DisruptionTarget: Ignore, whatever the code
        assert "got signal: 15" in err  # torchrun's own report
        assert not set(workers) & set(processes()), "workers outlived the launcher"
    finally:  # on failure, leave nothing running: launcher, torchrun, workers all name the FIFO
        proc.kill()
        for pid, cmd in processes().items():
            if str(fifo) in cmd:
                os.kill(pid, signal.SIGKILL)


def processes() -> dict[int, str]:
    """{pid: command line} of this machine's processes (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return out


@pytest.mark.parametrize("torchrun_code, recorded, expected", [
    (0, [], 0),
    (1, [], 1),                  # a crash: torchrun's code, retried
    (1, [1], 1),                 # a storage hiccup (exit 1) stays retryable
    (1, [3, 3], 3),
    (1, [2], 2),
    (1, [2, 3], 3),              # ranks disagree: input beats config, in either order
    (1, [3, 2], 3),
    (0, [2], 0),                 # torchrun succeeded: nothing to override
    (-signal.SIGKILL, [], 137),  # torchrun killed by a signal: 128 + N
])
def test_exit_code_table(torchrun_code, recorded, expected):
    assert exit_code(torchrun_code, recorded) == expected


def test_the_cli_records_its_exit_code(tmp_path, monkeypatch):
    record = tmp_path / "codes"
    monkeypatch.setenv("PIPELINE_EXIT_CODE_FILE", str(record))
    assert cli_main(["sft", "--run-id", "not/valid"]) == EXIT_CONFIG
    with pytest.raises(SystemExit):  # argparse: a bad flag is a usage error, exit 2
        cli_main(["sft", "--no-such-flag"])
    assert record.read_text() == "2\n2\n"


def test_an_unwritable_exit_code_file_does_not_hide_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_EXIT_CODE_FILE", str(tmp_path))  # a directory: open() fails
    assert cli_main(["sft", "--run-id", "not/valid"]) == EXIT_CONFIG


def test_accelerate_launch_fails_at_once_with_a_pointer_to_app_launch(tmp_path):
    """The reference guide starts DPO with `accelerate launch`; its launcher turns every exit code into
    1 (a retried crash to Kubernetes), so the phase refuses at once and names the command that keeps them."""
    import shutil

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = Path(shutil.which("accelerate") or "accelerate")
    store = tmp_path / "store"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    env.pop("PIPELINE_EXIT_CODE_FILE", None)
    started = time.monotonic()
    proc = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "1", "-m", "app", "dpo",
                           "--store", str(store), "--run-id", "acc"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    (first,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # accelerate adds its own
    assert first.startswith("error: accelerate launch reports every failure as exit 1")
    assert first.endswith(f"python -m app.launch --nproc-per-node 1 dpo --store {store} --run-id acc")
    assert "dpo  run=acc" not in proc.stdout and not store.exists()  # refused before the phase began
    assert time.monotonic() - started < 120
