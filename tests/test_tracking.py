"""Experiment trackers, for real and offline: the small run (conftest) reports every phase to
TensorBoard and to an MLflow file store; this reads them back with TensorBoard's own reader
(EventAccumulator) and MLflow's client, and checks them against the published artifacts.

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json

import pytest

from app import artifacts, tracking
from app.cli import parse
from app.errors import EXIT_CONFIG, ConfigError

PHASES = ("sft", "rollouts", "preferences", "dpo", "eval")


def metrics_file(store, run_id, phase) -> dict:
    path, _ = artifacts.fetch(artifacts.phase_uri(str(store), run_id, phase))
    return json.loads((path / ("metrics.json" if phase in ("sft", "dpo") else "summary.json")).read_text())


def tensorboard(store, run_id, phase):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(store / "tracking" / run_id / phase))
    accumulator.Reload()
    return accumulator


def mlflow_runs(store) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.mlflow_uri(str(store / "tracking")))
    experiment = client.get_experiment_by_name(tracking.PROJECT)
    assert experiment is not None, "no MLflow experiment gsm8k-posttrain in the file store"
    runs = client.search_runs([experiment.experiment_id])
    return client, {run.info.run_name: run for run in runs}


def test_tensorboard_has_the_training_curves_and_the_config(small_run):
    store, run_id, manifests = small_run
    for phase in ("sft", "dpo"):
        history = metrics_file(store, run_id, phase)["loss_history"]
        events = tensorboard(store, run_id, phase)
        losses = events.Scalars("train/loss")
        assert [e.step for e in losses] == [h["step"] for h in history]
        assert [round(e.value, 4) for e in losses] == [round(h["loss"], 4) for h in history]
        config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f"| run_id | {run_id} |" in config_text and "| seed | 0 |" in config_text
    dpo = tensorboard(store, run_id, "dpo")
    assert {"train/rewards/margins", "train/rewards/accuracies"} <= set(dpo.Tags()["scalars"])
    assert dpo.Scalars("train/rewards/margins")[0].value == pytest.approx(0.0, abs=0.02)  # step 0: policy == reference


def test_tensorboard_has_the_summaries_of_the_other_phases(small_run):
    store, run_id, _ = small_run
    rollouts = tensorboard(store, run_id, "rollouts")
    summary = metrics_file(store, run_id, "rollouts")
    for variant, accuracy in summary["accuracy_by_variant"].items():
        assert rollouts.Scalars(f"accuracy_by_variant/{variant}")[0].value == pytest.approx(accuracy)
    pairs = metrics_file(store, run_id, "preferences")
    assert tensorboard(store, run_id, "preferences").Scalars("by_type/correctness")[0].value == \
        pairs["by_type"]["correctness"]
    results = metrics_file(store, run_id, "eval")["results"]
    events = tensorboard(store, run_id, "eval")
    for dataset, by_model in results.items():
        for model, row in by_model.items():
            assert events.Scalars(f"results/{dataset}/{model}/accuracy")[0].value == pytest.approx(row["accuracy"])


def test_mlflow_runs_carry_the_resolved_config_and_the_metrics(small_run):
    store, run_id, manifests = small_run
    client, runs = mlflow_runs(store)
    assert set(runs) >= {f"{run_id}/{phase}" for phase in PHASES}
    for phase in PHASES:
        run = runs[f"{run_id}/{phase}"]
        assert run.info.status == "FINISHED"
        # The parameters are the phase's resolved config, exactly (the Trainer adds none of its own).
        config = manifests[phase]["config"]
        assert run.data.params == {k: ",".join(map(str, v)) if isinstance(v, list) else str(v)
                                   for k, v in config.items()}
        assert run.data.tags["phase"] == phase and run.data.tags["run_id"] == run_id

    sft_run = runs[f"{run_id}/sft"]
    history = metrics_file(store, run_id, "sft")["loss_history"]
    logged = client.get_metric_history(sft_run.info.run_id, "loss")
    assert sorted((m.step, round(m.value, 4)) for m in logged) == [(h["step"], round(h["loss"], 4)) for h in history]
    assert sft_run.data.metrics["steps"] == manifests["sft"]["metrics"]["steps"]

    dpo = runs[f"{run_id}/dpo"].data.metrics
    assert "rewards/margins" in dpo and "rewards/accuracies" in dpo
    assert dpo["step0_loss"] == pytest.approx(manifests["dpo"]["metrics"]["step0_loss"])

    results = manifests["eval"]["metrics"]["results"]
    evaluated = runs[f"{run_id}/eval"].data.metrics
    for dataset, by_model in results.items():
        for model, row in by_model.items():
            assert evaluated[f"results/{dataset}/{model}/accuracy"] == pytest.approx(row["accuracy"])
            assert evaluated[f"results/{dataset}/{model}/correct"] == row["correct"]
    assert runs[f"{run_id}/preferences"].data.metrics["pairs"] == manifests["preferences"]["metrics"]["pairs"]


@pytest.mark.parametrize("value, message", [
    ("comet", "choose none or any of tensorboard, mlflow, wandb"),
    ("none,mlflow", "'none' cannot be combined"),
])
def test_bad_report_to_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse(["sft", "--report-to", value], environ={})
    assert caught.value.exit_code == EXIT_CONFIG


def test_a_tracker_whose_library_is_missing_is_refused_before_any_model_loads(monkeypatch):
    monkeypatch.setitem(tracking._NEEDS, "wandb", ("no_such_tracker_module", "wandb"))
    with pytest.raises(ConfigError, match=r"--report-to wandb: .* not installed \(pip install wandb\)"):
        parse(["eval", "--report-to", "wandb"], environ={})


def test_report_to_comes_from_the_environment_and_leaves_the_identity_alone():
    _, config = parse(["rollouts"], environ={"PIPELINE_REPORT_TO": "tensorboard,mlflow"})
    assert config.report_to == ["tensorboard", "mlflow"]
    _, plain = parse(["rollouts"], environ={})
    assert plain.report_to == ["none"] and config.identity() == plain.identity()  # reporting is not an input


def test_flatten_keeps_numeric_leaves():
    assert tracking.flatten({"a": 1, "b": {"c": 0.5, "d": "x", "e": True}, "f": [1]}) == {"a": 1, "b/c": 0.5}


def test_trainer_settings_name_the_run_and_the_trackers(monkeypatch, tmp_path):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _, config = parse(["sft", "--run-id", "r1", "--report-to", "tensorboard", "--tracking-dir", str(tmp_path)],
                      environ={})
    assert tracking.trainer_settings(config, "sft") == {"report_to": ["tensorboard"], "run_name": "r1/sft"}
    import os

    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "r1" / "sft")
    _, none = parse(["dpo"], environ={})
    assert tracking.trainer_settings(none, "dpo")["report_to"] == "none"


def test_wandb_offline_writes_the_run_with_its_name_config_and_summary(tmp_path, monkeypatch):
    """W&B's client for real, without its service (WANDB_MODE=offline): the run's transaction log
    holds the name, the resolved config and the summary. (W&B's reader of that log is its
    service, so the bytes are checked here.)"""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "300")  # its local service starts slowly on a busy machine
    _, config = parse(["eval", "--run-id", "r1", "--report-to", "wandb", "--tracking-dir", str(tmp_path)], environ={})
    tracking.log_summary(config, "eval", {"results": {"gsm8k": {"sft": {"accuracy": 0.4375}}}})
    (log_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    data = log_file.read_bytes()
    assert b"r1/eval" in data and b"results/gsm8k/sft/accuracy" in data and b"question_batch_size" in data
