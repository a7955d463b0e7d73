"""Merge the shards of rollouts or eval, written by the pods of an Indexed Job.

    python -m app merge --phase rollouts --num-shards 4 --store s3://bucket/gsm8k --run-id r1

Reads the N shard manifests it is told to expect (`<phase>/shards/00000` ...), verifies
every file, concatenates the records in shard order (= question order) and publishes
the phase's own artifact, whose lineage names each shard. How a phase's shards join is
the phase's own rule: its module's `merge_shards`. Fails, naming them, if any
shard is missing: a partial merge is never published.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

from app import artifacts
from app.config import RunConfig, option, require
from app.log import log
from app.phases import ROUND_HELP, SHARDED, begin
from app.shards import fetch_shards


@dataclass
class Config(RunConfig):
    phase: str = option("rollouts", f"which sharded phase to merge: {' or '.join(SHARDED)}")
    num_shards: int = option(2, "how many shards the Indexed Job wrote")
    round: int = option(1, f"rollouts only: {ROUND_HELP}")

    def validate(self) -> None:
        super().validate()
        require(self.phase in SHARDED, f"--phase {self.phase!r}: use {' or '.join(SHARDED)}")
        require(self.num_shards >= 1, "--num-shards must be >= 1")
        require(self.round == 1 or self.phase == "rollouts", "--round: only rollouts have rounds (eval takes --rounds)")


def main(config: Config) -> dict | None:
    out_uri = artifacts.phase_uri(config.store, config.run_id, config.phase, config.round)
    if (published := begin(f"merge {config.phase}", out_uri, config, f"shards={config.num_shards}")) is not None:
        return published
    started = time.time()
    shards = fetch_shards(out_uri, config.num_shards)
    inputs = {f"shard_{i:05d}": artifacts.lineage_entry(uri, manifest) for i, (_, manifest, uri) in enumerate(shards)}
    phase = importlib.import_module(f"app.phases.{config.phase}")
    with artifacts.workdir(f"merge-{config.phase}") as work:
        metrics = phase.merge_shards([(path, manifest) for path, manifest, _ in shards], work, config.run_id)
        manifest = artifacts.publish(work, out_uri, phase=config.phase, config=config.to_dict(),
                                     identity=config.identity(), inputs=inputs, metrics=metrics,
                                     timings={"total_s": round(time.time() - started, 1)}, overwrite=config.force)
    log(f"merge: {config.num_shards} {config.phase} shards -> {out_uri}")
    return manifest
