"""Rebuild a run's report (report.md and report.html) from its published artifacts alone.

    python -m app report --store artifacts --run-id demo                  # ./artifacts/runs/demo/report.html
    python -m app report --store s3://bucket/gsm8k --run-id r1            # writes beside the run in S3
    aws s3 cp s3://bucket/gsm8k/runs/r1/report.html . && xdg-open report.html

Reads each phase's manifest and the files it lists (every checksum verified), so it works
for a run made by the Kubernetes Jobs as well as by `pipeline`, and for a run still in
progress (phases not yet published are shown as such). Writes `<store>/runs/<run-id>/report.md`
and `report.html`; the HTML page is one self-contained file (plots embedded), to open in
any browser. What it shows: app/report.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from app import artifacts, report
from app.config import RunConfig, run_field
from app.errors import InputError
from app.log import banner, log
from app.phases import PHASES


@dataclass
class Config:
    store: str = run_field("store")
    run_id: str = run_field("run_id")

    def validate(self) -> None:
        RunConfig.validate(self)  # the store and run id rules

    def to_dict(self) -> dict:
        return dict(vars(self))


def main(config: Config) -> dict:
    banner(f"report  run={config.run_id}  store={config.store}")
    artifacts.check_store(config.store)
    run = report.collect(config.store, config.run_id, PHASES)
    if not any(run.manifests.values()):
        raise InputError(f"{artifacts.run_uri(config.store, config.run_id)}: no phase of run "
                         f"{config.run_id!r} is published (wrong --store or --run-id?)")
    written = report.write(config.store, config.run_id, run)
    for uri in written.values():
        log(f"report: wrote {uri}")
    return written
