"""Merge the shards of rollouts or eval, written by the pods of an Indexed Job.

    python -m app merge --phase rollouts --num-shards 4 --store s3://bucket/gsm8k --run-id r1

Reads the N shard manifests it is told to expect (`<phase>/shards/00000` ...), verifies
every file, concatenates the records in shard order (= question order) and publishes
the phase's own artifact, whose lineage names each shard. Fails, naming them, if any
shard is missing: a partial merge is never published.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from app import artifacts
from app.config import RunConfig, option, require
from app.log import log
from app.phases import begin


@dataclass
class Config(RunConfig):
    phase: str = option("rollouts", "which sharded phase to merge: rollouts or eval")
    num_shards: int = option(2, "how many shards the Indexed Job wrote")

    def validate(self) -> None:
        super().validate()
        require(self.phase in ("rollouts", "eval"), f"--phase {self.phase!r}: use rollouts or eval")
        require(self.num_shards >= 1, "--num-shards must be >= 1")


def main(config: Config) -> dict | None:
    out_uri = artifacts.phase_uri(config.store, config.run_id, config.phase)
    if (published := begin(f"merge {config.phase}", out_uri, config, f"shards={config.num_shards}")) is not None:
        return published
    from app.data import read_jsonl, write_jsonl
    from app.shards import fetch_shards

    started = time.time()
    shards = fetch_shards(out_uri, config.num_shards)
    inputs = {f"shard_{i:05d}": artifacts.lineage_entry(uri, manifest) for i, (_, manifest, uri) in enumerate(shards)}
    with artifacts.workdir(f"merge-{config.phase}") as work:
        if config.phase == "rollouts":
            from app.phases.rollouts import summarize

            records = [row for path, _, _ in shards for _, row in read_jsonl(path / "rollouts.jsonl")]
            write_jsonl(work / "rollouts.jsonl", records)
            summary = summarize(records)
            summary["throughput"] = [m.get("timings", {}).get("generation") for _, m, _ in shards]
            (work / "summary.json").write_text(json.dumps(summary, indent=2))
        else:
            from app.phases.eval import render_report
            from app.phases.eval import summarize as summarize_eval

            names = [name for name in shards[0][1]["files"] if name.endswith(".jsonl")]
            records = {}
            for name in names:
                dataset, model = name[: -len(".jsonl")].split("/")
                rows = [row for path, _, _ in shards for _, row in read_jsonl(path / name)]
                records[(dataset, model)] = rows
                (work / dataset).mkdir(exist_ok=True)
                write_jsonl(work / name, rows)
            summary = summarize_eval(records)
            (work / "summary.json").write_text(json.dumps(summary, indent=2))
            report = render_report(summary, records, config.run_id)
            (work / "report.md").write_text(report)
            for line in report.splitlines():
                log(line)
        manifest = artifacts.publish(work, out_uri, phase=config.phase, config=config.to_dict(),
                                     identity=config.identity(), inputs=inputs,
                                     metrics={k: v for k, v in summary.items() if k != "throughput"},
                                     timings={"total_s": round(time.time() - started, 1)}, overwrite=config.force)
    log(f"merge: {len(records)} {'questions' if config.phase == 'rollouts' else 'result sets'} -> {out_uri}")
    return manifest
