"""scripts/docker-run.sh, without a Docker engine: the commands it would run (--print).

    python -m pytest tests/k8s/test_k8s_docker_run.py -q

The phase command it builds is parsed by app.cli.parse with the environment it passes to
the container, and the bucket-creation snippet is compiled, so a typo in either fails here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.k8s.test_k8s_manifests import launched

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "docker-run.sh"


def printed(*args: str) -> list[list[str]]:
    """The commands, each printed as one shell-quoted line (printf %q), split back by bash itself."""
    result = subprocess.run(["bash", str(SCRIPT), "--print", *args], capture_output=True, text=True, check=True)
    commands = []
    for line in result.stdout.splitlines():
        words = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, check=True)
        commands.append(words.stdout.split("\0")[:-1])
    return commands


def container_env(command: list[str]) -> dict[str, str]:
    return dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "-e")


def after_image(command: list[str], image: str) -> list[str]:
    return command[command.index(image) + 1:]


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_one_phase_on_cpu_against_minio():
    network, minio, bucket, phase = printed("--run-id", "dbg-1", "sft", "--preset", "tiny")
    assert network == ["docker", "network", "create", "gsm8k-debug"]
    assert minio[:3] == ["docker", "run", "-d"] and "server" in minio and "127.0.0.1:9000:9000" in minio
    compile(bucket[bucket.index("-c") + 1], "create-bucket", "exec")
    assert phase[:2] == ["docker", "run"] and "--gpus" not in phase
    for flag in ("--read-only", "--rm"):
        assert flag in phase
    assert phase[phase.index("--user") + 1] == "1000:1000"
    assert phase[phase.index("--network") + 1] == "gsm8k-debug"
    env = container_env(phase)
    assert env["AWS_ENDPOINT_URL"] == "http://gsm8k-minio:9000" and env["PIPELINE_RUN_ID"] == "dbg-1"
    argv = after_image(phase, "gsm8k-posttrain:cpu-dev")
    assert argv == ["sft", "--preset", "tiny"]

    from app.cli import parse

    name, config = parse(argv, environ=env)
    assert (name, config.run_id, config.store) == ("sft", "dbg-1", "s3://gsm8k/debug")


def test_a_multi_gpu_phase_with_torchrun_through_the_launcher():
    *_, phase = printed("--gpus", "all", "--torchrun", "8", "--image", "gsm8k-posttrain:dev", "dpo",
                        "--preset", "abel-7b")
    assert phase[phase.index("--gpus") + 1] == "all"
    assert phase[phase.index("--entrypoint") + 1] == "python"
    nproc, argv = launched(["python", *after_image(phase, "gsm8k-posttrain:dev")])
    assert nproc == 8

    from app.cli import parse

    name, config = parse(argv, environ=container_env(phase))
    assert (name, config.preset) == ("dpo", "abel-7b")


def test_the_whole_pipeline():
    *_, phase = printed("pipeline")
    from app.cli import COMMANDS

    assert after_image(phase, "gsm8k-posttrain:cpu-dev") == ["pipeline"] and "pipeline" in COMMANDS
