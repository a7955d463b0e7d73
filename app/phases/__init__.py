"""The phases: each module has a docstring with its command, a `Config` dataclass and `main(config)`.

`PHASES` is the one list of a run's phases, in order: the pipeline command runs them,
scripts/chain.py makes one Kubernetes Job each, the Argo template's steps follow it
(tests/k8s/test_k8s_argo.py checks that they do) and each publishes its artifact at
`artifacts.phase_uri(store, run_id, phase)`. `SHARDED` are the ones that can split their
questions over the pods of an Indexed Job; each of them has `merge_shards`, which
`python -m app merge` calls to join the shards.

`ROUND_PHASES` are what each later round of preference training redoes (Iterative RPO):
round r >= 2 rolls out from the latest policy (base + the DPO adapter of round r-1), makes
new pairs, and trains DPO starting from that adapter with it as the frozen reference.
Round r's artifacts live at `phase_uri(..., round=r)`; `policy_uri` names each round's start.
"""

from __future__ import annotations

import dataclasses

from app import artifacts, tracking
from app.data import check_data_spec
from app.log import banner, log, log_config
from app.models import check_base_model

PHASES = ("sft", "rollouts", "preferences", "dpo", "eval")
SHARDED = ("rollouts", "eval")
ROUND_PHASES = ("rollouts", "preferences", "dpo")
ROUND_HELP = ("round of preference training: 1 starts from the SFT adapter; r >= 2 from round r-1's DPO adapter, "
              "with its artifacts under <run>/round-<r>/")


def run_steps(rounds: int = 1, start: str = PHASES[0], stop: str = PHASES[-1]) -> list[tuple[str, int]]:
    """(phase, round) in the order a run with `rounds` rounds of preference training runs them:
    round 1's phases, rollouts -> preferences -> dpo again per later round, then eval; from the
    first `start` through the last `stop` (`rounds=2, start="dpo"`: dpo, all of round 2, eval)."""
    every = [(name, 1) for name in PHASES if name != "eval"]
    every += [(name, r) for r in range(2, rounds + 1) for name in ROUND_PHASES] + [("eval", 1)]
    first = next(i for i, (name, _) in enumerate(every) if name == start)
    last = max(i for i, (name, _) in enumerate(every) if name == stop)
    return every[first:last + 1]


def step_name(step: tuple[str, int]) -> str:
    """How logs, reports and Job names call a (phase, round): `dpo`, `round-2/dpo`."""
    name, r = step
    return name if r <= 1 else f"round-{r}/{name}"


def policy_uri(store: str, run_id: str, round: int) -> str:
    """The adapter round `round` samples from and starts DPO at: SFT for round 1, else the previous DPO."""
    return artifacts.phase_uri(store, run_id, "sft") if round <= 1 else artifacts.phase_uri(store, run_id, "dpo", round - 1)


def policy_input(round: int) -> str:
    """The lineage key of that adapter in a manifest's inputs."""
    return "sft" if round <= 1 else f"dpo_round_{round - 1}"


def begin(name: str, out_uri: str, config, detail: str = "") -> dict | None:
    """Announce the phase, reach the store before any model loads, and return the published
    manifest when there is nothing to do (same config, same inputs, no --force)."""
    banner(f"{name}  run={config.run_id}" + (f"  {detail}" if detail else "") + f"  -> {out_uri}")
    log_config(config)
    artifacts.check_store(config.store)
    if tracking.chosen(config.report_to):
        log(tracking.describe(config))
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
