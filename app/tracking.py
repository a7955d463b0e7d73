"""Experiment trackers: TensorBoard, MLflow and W&B, as the HF Trainer names them.

    python -m app sft --report-to tensorboard,mlflow --tracking-dir /scratch/tracking

Every phase takes `--report-to` (`none`, the default, or a comma list of `tensorboard`,
`mlflow`, `wandb`). Each phase is one tracker run named `<run-id>/<phase>` whose parameters
are the phase's resolved config (the fields `--help` lists) and whose metrics are:
- sft, dpo: the Trainer's own integration logs every logged step (loss, learning rate,
  grad norm; DPO's rewards/margins and rewards/accuracies) under `train/`; this module
  opens the run first, so the Trainer logs into it, then adds the phase's summary metrics;
- rollouts, preferences, eval: their summary metrics (accuracy by variant, pair counts,
  accuracy per dataset and model, ...), nested names joined with `/`.

Where the runs go:
- TensorBoard: event files under `<tracking-dir>/<run-id>/<phase>/`
  (`tensorboard --logdir <tracking-dir>`);
- MLflow: `MLFLOW_TRACKING_URI` (a server, `databricks`, or a `file:` store); unset, a file
  store at `<tracking-dir>/mlruns`. The experiment is `MLFLOW_EXPERIMENT_NAME`, default
  `gsm8k-posttrain`. MLflow 3 refuses file stores unless `MLFLOW_ALLOW_FILE_STORE=true`;
  it is set here when the URI is a `file:` one;
- W&B: project `WANDB_PROJECT` (default `gsm8k-posttrain`), files under `<tracking-dir>`;
  it needs `WANDB_API_KEY` and its service, or `WANDB_MODE=offline` to write the runs to
  disk for a later `wandb sync`.

Only the main process (rank 0) opens runs. Components never parse arguments: the phases
pass their config in.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
from pathlib import Path

from app.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow", "wandb")
PROJECT = "gsm8k-posttrain"
# The module each tracker needs, and the pip requirement that brings it.
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
          "wandb": ("wandb", "wandb")}


def chosen(report_to: list[str]) -> list[str]:
    """The trackers of a `--report-to` value; [] for `none`."""
    return [name for name in report_to if name != "none"]


def validate(report_to: list[str]) -> None:
    """Refuse an unknown tracker or one whose library is missing, before any model loads."""
    names = list(report_to)
    unknown = [n for n in names if n not in TRACKERS and n != "none"]
    if unknown or not names:
        raise ConfigError(f"--report-to {','.join(names)}: choose none or any of {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"--report-to {','.join(names)}: 'none' cannot be combined with a tracker")
    for name in chosen(names):
        module, requirement = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name}: the {module} library is not installed (pip install {requirement})")


def run_name(run_id: str, phase: str) -> str:
    return f"{run_id}/{phase}"


def tensorboard_dir(tracking_dir: str, run_id: str, phase: str) -> Path:
    return Path(tracking_dir).expanduser() / run_id / phase


def mlflow_uri(tracking_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(tracking_dir).expanduser().resolve() / "mlruns").as_uri()


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {"a/b": value}; bools, strings and lists are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def _params(config: dict) -> dict[str, str]:
    return {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in config.items()}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class TrackerRun:
    """One phase's run in each chosen tracker: parameters at the start, metrics as they come."""

    def __init__(self, report_to: list[str], tracking_dir: str, run_id: str, phase: str, config: dict):
        for left_open in list(_OPEN):  # a phase that raised before closing its run (one process, many phases)
            left_open.close(failed=True)
        self.trackers = chosen(report_to) if _is_main_process() else []
        self.name = run_name(run_id, phase)
        self._tb = self._mlflow = self._wandb = None
        params = _params(config)
        if "tensorboard" in self.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard_dir = tensorboard_dir(tracking_dir, run_id, phase)
            self._tb = SummaryWriter(log_dir=str(self.tensorboard_dir))
            table = "\n".join(["| parameter | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in params.items())])
            self._tb.add_text("config", table)
            self._tb.flush()
        if "mlflow" in self.trackers:
            import mlflow

            uri = mlflow_uri(tracking_dir)
            if uri.startswith("file:"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
            self._mlflow = mlflow.start_run(run_name=self.name, tags={"run_id": run_id, "phase": phase})
            items = list(params.items())
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[start:start + 100]))
        if "wandb" in self.trackers:
            import wandb

            root = Path(tracking_dir).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=self.name, group=run_id,
                                     job_type=phase, config=config, dir=str(root), reinit="finish_previous")
        if self.trackers:
            _OPEN.append(self)

    def log_metrics(self, metrics: dict, step: int = 0) -> dict[str, float]:
        """Log the numeric leaves of `metrics` (nested names joined with '/'); returns what was logged."""
        values = flatten(metrics)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._mlflow is not None:
            import mlflow

            # MLflow's names allow letters, digits, '_', '-', '.', ' ', ':' and '/'
            mlflow.log_metrics({_mlflow_key(k): v for k, v in values.items()}, step=step)
        if self._wandb is not None:
            self._wandb.summary.update(values)
        return values

    def close(self, failed: bool = False) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            import mlflow

            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == self._mlflow.info.run_id:
                mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self._mlflow = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None

    def __enter__(self) -> "TrackerRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


_OPEN: list[TrackerRun] = []
atexit.register(lambda: [run.close(failed=True) for run in list(_OPEN)])


def _mlflow_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


def open_run(config, phase: str) -> TrackerRun:
    """The phase's tracker run (a no-op object for `--report-to none`)."""
    return TrackerRun(config.report_to, config.tracking_dir, config.run_id, phase, config.to_dict())


def log_summary(config, phase: str, metrics: dict) -> None:
    """For the phases without a trainer: one run with the resolved config and the summary metrics."""
    if not chosen(config.report_to):
        return
    with open_run(config, phase) as run:
        run.log_metrics(metrics)


def shard_phase(phase: str, config) -> str:
    """The run's phase name: `eval`, or `eval-shard-2` for one pod of an Indexed Job."""
    return phase if config.num_shards == 1 else f"{phase}-shard-{config.shard_index}"


def trainer_settings(config, phase: str) -> dict:
    """TrainingArguments for the HF Trainer's own integrations: which trackers, and the run's name.

    The Trainer's callbacks read their locations from the environment, set here: its
    TensorBoard writer logs into the same directory as the phase's run, and its MLflow
    callback logs into the run `open_run` started (it logs no parameters of its own, so
    the run's parameters stay the resolved config: MLFLOW_MAX_LOG_PARAMS=0)."""
    trackers = chosen(config.report_to)
    if "tensorboard" in trackers:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(config.tracking_dir, config.run_id, phase))
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_MAX_LOG_PARAMS", "0")
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_PROJECT", PROJECT)
        os.environ.setdefault("WANDB_DIR", str(Path(config.tracking_dir).expanduser()))
    return {"report_to": trackers or "none", "run_name": run_name(config.run_id, phase)}


def describe(config) -> str:
    """One line for the log: where this phase's tracker runs go."""
    parts = []
    for name in chosen(config.report_to):
        if name == "tensorboard":
            parts.append(f"tensorboard {Path(config.tracking_dir).expanduser()}")
        elif name == "mlflow":
            parts.append(f"mlflow {mlflow_uri(config.tracking_dir)}")
        else:
            parts.append(f"wandb project {os.environ.get('WANDB_PROJECT', PROJECT)}"
                         + (" (offline)" if os.environ.get("WANDB_MODE") == "offline" else ""))
    return "trackers: " + (", ".join(parts) if parts else "none")

