"""What a published artifact was built from: its inputs, theirs, and whether each is still that version.

    python -m app lineage --phase dpo --store s3://bucket/gsm8k --run-id r1
    python -m app lineage --phase eval --json          # one JSON object per line

Starts at `<store>/runs/<run-id>/<phase>/` and follows every input its manifest names,
depth first. Each artifact is `ok` (still the version its consumer read), `replaced`
(republished since, e.g. by a `--force` rerun: what was built from it is stale) or
`missing`; inputs that are not artifacts (a dataset spec) are shown with their value.
Exits 3 when the artifact itself is not published.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from app import artifacts
from app.config import RunConfig, option, require, run_field
from app.errors import InputError
from app.log import redact, redact_values
from app.phases import PHASES

ARTIFACTS = ("base", *PHASES)


@dataclass
class Config:
    store: str = run_field("store")
    run_id: str = run_field("run_id")
    phase: str = option("dpo", f"whose lineage: {', '.join(ARTIFACTS)}")
    json: bool = option(False, "print one JSON object per line instead of the indented tree")

    def validate(self) -> None:
        RunConfig.validate(self)  # the store and run id rules
        require(self.phase in ARTIFACTS, f"--phase {self.phase!r}: choose from {', '.join(ARTIFACTS)}")

    def to_dict(self) -> dict:
        return dict(vars(self))


def main(config: Config) -> list[dict]:
    uri = artifacts.phase_uri(config.store, config.run_id, config.phase)
    rows = artifacts.trace(uri)
    if rows[0]["status"] == "missing":
        raise InputError(f"{uri} is not published (no {artifacts.MANIFEST})")
    for row in rows:
        print(json.dumps(redact_values(row), sort_keys=True) if config.json else redact(describe(row)), flush=True)
    return rows


def describe(row: dict) -> str:
    indent = "  " * row["depth"]
    name = f"{row['input']}: " if row.get("input") else ""
    if "uri" not in row:
        return f"{indent}{name}{row['value']}"
    return (f"{indent}{name}{row['phase']}  {row['status']}  {row['uri']}  "
            f"created {row['created_at']}  config {row['config_hash']}  code {row['code_version']}")
