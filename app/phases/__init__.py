"""The phases: each module has a docstring with its command, a `Config` dataclass and `main(config)`.

`PHASES` is the one list of a run's phases, in order: the pipeline command runs them,
scripts/chain.py makes one Kubernetes Job each, the Argo template's steps follow it
(tests/k8s/test_k8s_argo.py checks that they do) and each publishes its artifact at
`artifacts.phase_uri(store, run_id, phase)`. `SHARDED` are the ones that can split their
questions over the pods of an Indexed Job; each of them has `merge_shards`, which
`python -m app merge` calls to join the shards.
"""

from __future__ import annotations

import dataclasses

from app import artifacts
from app.data import check_data_spec
from app.log import banner, log, log_config
from app.models import check_base_model

PHASES = ("sft", "rollouts", "preferences", "dpo", "eval")
SHARDED = ("rollouts", "eval")


def begin(name: str, out_uri: str, config, detail: str = "") -> dict | None:
    """Announce the phase, reach the store before any model loads, and return the published
    manifest when there is nothing to do (same config, same inputs, no --force)."""
    banner(f"{name}  run={config.run_id}" + (f"  {detail}" if detail else "") + f"  -> {out_uri}")
    log_config(config)
    artifacts.check_store(config.store)
    if not config.force:
        artifacts.refuse_other_config(out_uri, config.identity())  # before any model or data loads
        if artifacts.is_current(out_uri, config.identity()):
            log(f"{name}: {out_uri} is already published with this config; nothing to do (--force to redo)")
            return artifacts.read_manifest(out_uri)
    check_inputs(config)
    return None


def check_inputs(config) -> None:
    """Every data file, object and model directory the config names is there and is what it must
    be (exit 3 otherwise), before any model or data loads."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not field.metadata.get("location") or field.name == "store" or not isinstance(value, str):
            continue
        if field.name == "base_model":
            check_base_model(value)
        else:
            check_data_spec(value, "--" + field.name.replace("_", "-"))
