"""The whole pipeline in one process: sft -> rollouts -> preferences -> dpo -> eval.

    python -m app pipeline                          # embedded demo: tiny model, CPU, a few minutes
    python -m app pipeline --run-id try2 --from dpo # resume a run at DPO (earlier phases must exist)
    python -m app pipeline --preset abel-7b --store s3://bucket/gsm8k --run-id r1   # one GPU box
    python -m app pipeline --preset small --run-id pg --rounds 2    # two rounds of preference training

`--rounds N` repeats rollouts -> preferences -> dpo after the first DPO, N-1 more times (Iterative
RPO): round r samples from the latest policy (base + round r-1's DPO adapter), pairs its own
trajectories, and trains DPO from that adapter with it as the frozen reference; round r's
artifacts live under `<store>/runs/<run-id>/round-<r>/`, and eval reports every round.

Every flag of every phase is accepted here and handed to the phases that have it.
Each phase publishes its artifact before the next starts, and a phase already
published with the same config and inputs is skipped, so rerunning after a crash
picks up where it stopped. On a cluster the same phases run as one Kubernetes Job
each (k8s/, scripts/chain.py); this command is for one machine and for debugging.
At the end it prints the Base -> SFT -> DPO table and writes `<store>/runs/<run-id>/report.md` and
`report.html` (app/report.py; `python -m app report` rebuilds them from the store).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
import typing

from app import artifacts, report
from app.config import RunConfig, option, require
from app.log import banner, log
from app.phases import PHASES, check_inputs, run_steps, step_name

PHASE_MODULES = {name: f"app.phases.{name}" for name in PHASES}


def _phase_config_classes() -> dict[str, type]:
    return {name: importlib.import_module(module).Config for name, module in PHASE_MODULES.items()}


def _union_fields() -> list[tuple]:
    """Every phase's fields once (the first definition wins), for the pipeline's own flags."""
    # One process runs every phase, so the Indexed-Job sharding flags have no meaning here.
    # Nor does a phase's --round: the pipeline runs every round (--rounds) itself.
    base_names = {f.name for f in dataclasses.fields(RunConfig)} | {"num_shards", "shard_index", "round"}
    seen: dict[str, tuple] = {}
    for cls in _phase_config_classes().values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in base_names or f.name in seen:
                continue
            kwargs = {"metadata": f.metadata}
            if f.default_factory is not dataclasses.MISSING:
                kwargs["default_factory"] = f.default_factory
            else:
                kwargs["default"] = f.default
            seen[f.name] = (f.name, hints[f.name], dataclasses.field(**kwargs))
    return list(seen.values())


_PipelineFields = dataclasses.make_dataclass("_PipelineFields", _union_fields(), bases=(RunConfig,))


@dataclasses.dataclass
class Config(_PipelineFields):
    from_phase: str = option("sft", "first phase to run (earlier ones must already be published)", aliases=("--from",))
    to_phase: str = option("eval", "last phase to run", aliases=("--to",))

    def validate(self) -> None:
        RunConfig.validate(self)
        require(self.from_phase in PHASES, f"--from-phase {self.from_phase!r}: choose from {PHASES}")
        require(self.to_phase in PHASES, f"--to-phase {self.to_phase!r}: choose from {PHASES}")
        require(PHASES.index(self.from_phase) <= PHASES.index(self.to_phase),
                "--from-phase comes after --to-phase")
        for config in self.phase_configs().values():
            config.validate()

    def phases(self) -> list[str]:
        return list(PHASES[PHASES.index(self.from_phase): PHASES.index(self.to_phase) + 1])

    def steps(self) -> list[tuple[str, int]]:
        """(phase, round) in the order they run: round 1's phases, then rollouts, preferences and
        dpo again for each later round, before eval; from the first --from through the last --to
        (`--rounds 2 --from dpo` trains round 1's DPO, then all of round 2, then evaluates)."""
        return run_steps(self.rounds, self.from_phase, self.to_phase)

    def phase_configs(self, round: int = 1) -> dict[str, RunConfig]:
        """Each phase's config; those with a --round (rollouts, preferences, dpo) set to `round`."""
        values = dataclasses.asdict(self)
        out = {}
        for name, cls in _phase_config_classes().items():
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            out[name] = cls(**{k: v for k, v in values.items() if k in names})
            if "round" in names:
                out[name].round = round
        return out


def main(config: Config) -> dict:
    steps = config.steps()
    banner(f"pipeline  run={config.run_id}  phases={' -> '.join(map(step_name, steps))}  "
           f"-> {artifacts.run_uri(config.store, config.run_id)}")
    artifacts.check_store(config.store)
    configs = config.phase_configs()
    for name in config.phases():  # a bad --eval-data fails now, not after hours of training
        check_inputs(configs[name])
    timings: dict[str, dict] = {}
    started = time.time()
    for name, r in steps:
        phase_config = config.phase_configs(r)[name]
        phase_started = time.time()
        uri = artifacts.phase_uri(config.store, config.run_id, name, r)
        skipped = not config.force and artifacts.is_current(uri, phase_config.identity())
        importlib.import_module(PHASE_MODULES[name]).main(phase_config)
        timings[step_name((name, r))] = {"seconds": round(time.time() - phase_started, 1), "skipped": skipped}
    run, total = report.collect(config.store, config.run_id, PHASES), time.time() - started
    written = report.write(config.store, config.run_id, run, timings, total)
    markdown = report.render_markdown(run, timings, total)
    banner("run report")
    for line in markdown.splitlines():
        log(line)
    log(f"report: {written['report.html']} (open it in a browser; `python -m app report` rebuilds it)")
    return {"timings": timings, "report": markdown}
