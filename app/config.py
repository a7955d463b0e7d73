"""Fields every phase shares: where the run's artifacts live and which run this is."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field

from app.errors import ConfigError

# As a Kubernetes label value (and a safe object key): letters, digits, '.', '_', '-', at most 63,
# starting and ending with a letter or digit. `fullmatch`, so a trailing newline is refused too.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
RUN_ID_RULE = "letters, digits, '.', '_' and '-', at most 63 characters, starting and ending with a letter or digit"


BUILT_BASE_MODELS = ("tiny", "small")  # base models app/tiny.py builds, named by --base-model


def option(default, help: str, aliases: tuple[str, ...] = (), location: bool = False, added: bool = False,
           **kwargs):
    """A config field with its `--help` text (and extra flag spellings); lists get a factory.

    `location`: the value may be a local path (a store, a data file, a model directory), which
    the config's identity compares resolved, so `artifacts` and `./artifacts` are the same store.
    `added`: a field added after artifacts were published without it; at its default it is left out
    of the identity, so those artifacts still count as the same config."""
    metadata = {"help": help, "aliases": aliases, "location": location, "added": added}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class RunConfig:
    store: str = option("artifacts", "artifact store root: a local directory or s3://bucket/prefix", location=True)
    run_id: str = option("demo", "run id; artifacts live under <store>/runs/<run-id>/<phase>/ "
                         "(lowercase letters, digits and '-', as in a Kubernetes label)")
    preset: str = option("tiny", "bundle of defaults: 'tiny' (embedded CPU demo), 'small' (the one-GPU proving "
                         "ground for preference training) or 'abel-7b' (the reference case)")
    base_model: str = option("tiny", "base model: a hub id (GAIR/Abel-7B-002), a local directory, "
                             "an s3:// artifact, 'tiny' (the locally built demo model) or 'small' (the locally "
                             "built proving-ground model)", location=True)
    seed: int = option(0, "random seed for data order, sampling and initialisation")
    force: bool = option(False, "redo the phase even if its artifact is already published with the same config")
    report_to: list[str] = option(["none"], "experiment trackers for this phase's run: none, or a comma list of "
                                  "tensorboard, mlflow, wandb (app/tracking.py)")
    tracking_dir: str = option("tracking", "where tracker runs go: TensorBoard event files under "
                               "<dir>/<run-id>/<phase>/, MLflow's file store <dir>/mlruns unless "
                               "MLFLOW_TRACKING_URI is set, W&B's files")

    def validate(self) -> None:
        if not RUN_ID_PATTERN.fullmatch(self.run_id):
            raise ConfigError(f"--run-id {self.run_id!r}: use {RUN_ID_RULE}")
        if not self.store:
            raise ConfigError("--store must not be empty")
        if hasattr(self, "report_to"):  # commands that borrow only the store and run id have none
            from app import tracking

            tracking.validate(self.report_to)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The values that decide the phase's output, as the run uses them: numbers by their field's
        type (3 and 3.0 epochs are one config), local paths resolved (`artifacts` is `./artifacts`). Where the
        output goes (`store`, `run_id`), `force` (an instruction) and where metrics are reported
        (`report_to`, `tracking_dir`) are not part of it."""
        hints = typing.get_type_hints(type(self))
        values = {}
        for f in dataclasses.fields(self):
            if f.name in ("store", "run_id", "force", "report_to", "tracking_dir"):
                continue
            value = getattr(self, f.name)
            if f.metadata.get("added") and value == _default(f):
                continue
            if unwrap_optional(hints[f.name]) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if f.metadata.get("location") and isinstance(value, str):
                value = resolve_location(value)
            values[f.name] = value
        return values


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def resolve_location(value: str) -> str:
    """A local path made absolute; URIs (s3://, hf:), generated data (synthetic:N), the built base
    models ('tiny', 'small') and hub ids (org/name, when no such local path exists) are returned as they are."""
    if "://" in value or value.startswith(("hf:", "synthetic")) or value in BUILT_BASE_MODELS:
        return value.rstrip("/") if value.startswith("s3://") else value
    if value.startswith(("/", "./", "../", "~")) or value in (".", "..") or os.path.exists(value):
        return os.path.normpath(os.path.abspath(os.path.expanduser(value)))
    return value


def unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def run_field(name: str):
    """RunConfig's field of that name (default and --help text), for a config that needs only a few."""
    field_ = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
    return dataclasses.field(default=field_.default, metadata=field_.metadata)
