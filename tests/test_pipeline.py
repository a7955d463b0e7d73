"""The embedded default, exactly as the README's demo command runs it: `python -m app pipeline`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import artifacts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_embedded_pipeline_runs_every_phase_with_defaults(tmp_path):
    env = {**os.environ, "PIPELINE_WORKDIR": str(tmp_path / "work"), "PIPELINE_CACHE": str(tmp_path / "cache")}
    env = {k: v for k, v in env.items() if not k.startswith("PIPELINE_") or k in ("PIPELINE_WORKDIR", "PIPELINE_CACHE")}
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "app", "pipeline", "--store", str(tmp_path / "artifacts")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=3000)
    elapsed = time.time() - started
    print(f"embedded pipeline: {elapsed:.0f}s")
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-4000:]

    store = str(tmp_path / "artifacts")
    for phase in ("base", "sft", "rollouts", "preferences", "dpo", "eval"):
        assert artifacts.read_manifest(artifacts.phase_uri(store, "demo", phase)) is not None, phase
    report = (tmp_path / "artifacts" / "runs" / "demo" / "report.md").read_text()
    assert "| sft | ran |" in report and "| eval | ran |" in report
    assert "Base " in report and " -> SFT " in report and " -> DPO " in report
    page = (tmp_path / "artifacts" / "runs" / "demo" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 6  # every plot, embedded
    assert "Base " in result.stdout and "run report" in result.stdout
    # Logs meant for `kubectl logs`: every phase announces itself with a banner line.
    for phase in ("sft", "rollouts", "preferences", "dpo", "eval"):
        assert f"= {phase}  run=demo" in result.stdout
