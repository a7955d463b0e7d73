"""Fields every phase shares: where the run's artifacts live and which run this is."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from app.errors import ConfigError

RUN_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def option(default, help: str, aliases: tuple[str, ...] = (), **kwargs):
    """A config field with its `--help` text (and extra flag spellings); lists get a factory."""
    metadata = {"help": help, "aliases": aliases}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class RunConfig:
    store: str = option("runs", "artifact store root: a local directory or s3://bucket/prefix")
    run_id: str = option("demo", "run id; artifacts live under <store>/runs/<run-id>/<phase>/ "
                         "(lowercase letters, digits and '-', as in a Kubernetes label)")
    preset: str = option("tiny", "bundle of defaults: 'tiny' (embedded CPU demo) or 'abel-7b' (the reference case)")
    base_model: str = option("tiny", "base model: a hub id (GAIR/Abel-7B-002), a local directory, "
                             "an s3:// artifact, or 'tiny' for the locally built demo model")
    seed: int = option(0, "random seed for data order, sampling and initialisation")
    force: bool = option(False, "redo the phase even if its artifact is already published with the same config")

    def validate(self) -> None:
        if not RUN_ID_PATTERN.match(self.run_id):
            raise ConfigError(f"--run-id {self.run_id!r}: use lowercase letters, digits and '-', at most 63 characters")
        if not self.store:
            raise ConfigError("--store must not be empty")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The fields that decide the phase's output; `force` is an instruction, not an input."""
        values = self.to_dict()
        values.pop("force", None)
        return values


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
