"""scripts/chain.py against a Kubernetes API over HTTP, through the real `kubernetes` client.

    python -m pytest tests/k8s/test_k8s_chain.py -q

The API server is tests/k8s/fakekube.py: an in-process fake (no real kube-apiserver can
run here; its docstring says what it models and what it does not). It enforces the
overlay's own Role, validates Jobs against the Kubernetes schema and applies each Job's
own podFailurePolicy. The store is real: a local directory, or S3 on a moto server,
read through app.artifacts exactly as chain.py does in production.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from app.phases import PHASES
from tests.k8s.fakekube import FakeKube, PodRun
from tests.s3_server import moto_endpoint, new_bucket, point_at  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parents[2]


def load_chain():
    spec = importlib.util.spec_from_file_location("chain", ROOT / "scripts" / "chain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chain"] = module
    spec.loader.exec_module(module)
    return module


chain = load_chain()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """The local overlay, rendered once by real `kubectl kustomize`."""
    docs = chain.render("local")
    path = tmp_path_factory.mktemp("rendered") / "local.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


@pytest.fixture(scope="module")
def role_rules(rendered) -> list[dict]:
    docs = list(yaml.safe_load_all(rendered.read_text()))
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "pipeline-chain"]
    return role["rules"]


def role_grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(verb, group, resource) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def scripted(outcomes: dict | None = None):
    """A runtime: every phase logs two lines and succeeds, unless `outcomes[phase]` says
    otherwise (a PodRun, or a list of PodRuns, one per attempt)."""
    outcomes = outcomes or {}

    def runtime(job: dict, attempt: int) -> PodRun:
        phase = job["metadata"]["labels"]["gsm8k.dev/phase"]
        run_id = job["metadata"]["labels"]["gsm8k.dev/run"]
        wanted = outcomes.get(phase)
        if isinstance(wanted, list):
            wanted = wanted[min(attempt, len(wanted) - 1)]
        if wanted is not None:
            return wanted
        return PodRun(lines=[f"{phase} of {run_id} attempt {attempt}: step 1", f"{phase}: done"])

    return runtime


@pytest.fixture
def kube(role_rules):
    fakes = []

    def make(runtime=None, rules=role_rules) -> FakeKube:
        fake = FakeKube(runtime or scripted(), role_rules=rules, namespace="gsm8k").start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()


def run_chain(fake: FakeKube | None, rendered: Path, tmp_path: Path, *args: str) -> int:
    argv = ["--rendered", str(rendered), "--poll-seconds", "0.02", *args]
    if fake is not None:
        argv += ["--kubeconfig", fake.kubeconfig(tmp_path / "kubeconfig")]
    if "--store" not in args and "--no-skip" not in args:
        argv += ["--store", str(tmp_path / "store")]
    return chain.main(argv)


def created(fake: FakeKube) -> list[str]:
    return [name for verb, _, resource, name in fake.requests if verb == "create" and resource == "jobs"]


def publish(store: str, run_id: str, phase: str, tmp_path: Path) -> None:
    from app.artifacts import phase_uri
    from app.artifacts import publish as publish_artifact

    out = tmp_path / f"out-{phase}"
    out.mkdir(exist_ok=True)
    (out / "result.json").write_text('{"ok": true}')
    publish_artifact(out, phase_uri(store, run_id, phase), phase=phase, config={"phase": phase})


# ---------------------------------------------------------------------------------------------
# The happy path


def test_runs_every_phase_in_order_and_streams_logs(kube, rendered, tmp_path, capsys):
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r1") == 0
    out, err = capsys.readouterr()
    assert created(fake) == [f"r1-{p}" for p in PHASES]
    # Every phase's log lines, in phase order, prefixed with the phase.
    positions = [out.index(f"[{p}] {p} of r1 attempt 0: step 1") for p in PHASES]
    assert positions == sorted(positions)
    assert "[sft] config ok" in out  # the config check's log comes first
    assert "every selected phase is done" in err
    for phase in PHASES:
        job = fake.jobs[f"r1-{phase}"]
        assert job["metadata"]["labels"]["gsm8k.dev/run"] == "r1"
        assert job["spec"]["template"]["metadata"]["labels"]["gsm8k.dev/run"] == "r1"
        assert job["spec"]["suspend"] is False
        assert any(c["type"] == "Complete" for c in job["status"]["conditions"])
    assert fake.denied == []


# ---------------------------------------------------------------------------------------------
# Failures: stop at the first, say why, say how to resume


def test_config_error_fails_the_job_at_once_and_stops_the_chain(kube, rendered, tmp_path, capsys):
    fake = kube(scripted({"dpo": PodRun(lines=["error: --dpo-beta must be > 0"], exit_code=2)}))
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r2") == 1
    out, err = capsys.readouterr()
    assert created(fake) == ["r2-sft", "r2-rollouts", "r2-preferences", "r2-dpo"]  # eval never starts
    assert len(fake.jobs["r2-dpo"]["_pods"]) == 1  # FailJob: no retry of a config error
    assert "[dpo] error: --dpo-beta must be > 0" in out
    assert "dpo FAILED" in err and "PodFailurePolicy" in err
    assert "exit code 2: a config or usage error" in err
    assert "--run-id r2 --from dpo" in err


def test_config_error_in_the_check_container_fails_fast_too(kube, rendered, tmp_path, capsys):
    """The init container's exit 2 fails the Job before the phase (and torchrun) starts."""
    fake = kube(scripted({"sft": PodRun(init_lines=["config error: --lora-r must be positive"], init_exit_code=2)}))
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r3") == 1
    out, err = capsys.readouterr()
    assert created(fake) == ["r3-sft"]
    assert len(fake.jobs["r3-sft"]["_pods"]) == 1
    assert "[sft] config error: --lora-r must be positive" in out
    assert "exit code 2" in err and "PodFailurePolicy" in err


def test_crashes_are_retried_up_to_backoff_limit(kube, rendered, tmp_path, capsys):
    crash = PodRun(lines=["CUDA error: an illegal memory access"], exit_code=1)
    fake = kube(scripted({"rollouts": crash}))
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r4") == 1
    out, err = capsys.readouterr()
    backoff_limit = fake.jobs["r4-rollouts"]["spec"]["backoffLimit"]
    assert len(fake.jobs["r4-rollouts"]["_pods"]) == backoff_limit + 1
    assert out.count("[rollouts] CUDA error") == backoff_limit + 1  # every attempt's log is shown
    assert "BackoffLimitExceeded" in err and "exit code 1" in err


def test_a_crash_then_a_success_completes(kube, rendered, tmp_path, capsys):
    fake = kube(scripted({"sft": [PodRun(lines=["NCCL timeout"], exit_code=1), PodRun(lines=["sft: done"])]}))
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r5", "--only", "sft") == 0
    assert len(fake.jobs["r5-sft"]["_pods"]) == 2


def test_preemption_does_not_count_against_backoff_limit(kube, rendered, tmp_path, capsys):
    preempted = PodRun(lines=["step 10"], disrupted=True)
    fake = kube(scripted({"sft": [preempted, preempted, preempted, preempted, PodRun(lines=["sft: done"])]}))
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r6", "--only", "sft") == 0
    _, err = capsys.readouterr()
    pods = fake.jobs["r6-sft"]["_pods"]
    assert len(pods) == 5 > fake.jobs["r6-sft"]["spec"]["backoffLimit"] + 1
    assert "disrupted (PreemptionByScheduler" in err


def test_a_pod_stuck_on_a_missing_secret_gets_a_hint(kube, rendered, tmp_path, capsys):
    stuck = PodRun(lines=["ok"], waiting=("CreateContainerConfigError", 'secret "pipeline-s3" not found'), waiting_s=0.3)
    fake = kube(scripted({"sft": stuck}))
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r7", "--only", "sft") == 0
    _, err = capsys.readouterr()
    assert 'CreateContainerConfigError: secret "pipeline-s3" not found' in err
    assert "get secret pipeline-s3" in err


# ---------------------------------------------------------------------------------------------
# Resuming, skipping, reusing Jobs


def test_resume_from_a_phase(kube, rendered, tmp_path):
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r8", "--from", "dpo") == 0
    assert created(fake) == ["r8-dpo", "r8-eval"]


def test_phases_published_in_the_store_are_skipped(kube, rendered, tmp_path, capsys):
    store = str(tmp_path / "store")
    for phase in ("sft", "rollouts"):
        publish(store, "r9", phase, tmp_path)
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r9", "--store", store) == 0
    _, err = capsys.readouterr()
    assert created(fake) == ["r9-preferences", "r9-dpo", "r9-eval"]
    assert f"sft: skipped, already published at {store}/runs/r9/sft/manifest.json" in err


def test_skip_reads_manifests_from_s3(kube, rendered, tmp_path, moto_endpoint, monkeypatch, capsys):  # noqa: F811
    point_at(monkeypatch.setenv, monkeypatch.delenv, moto_endpoint, tmp_path)
    bucket = new_bucket(moto_endpoint)
    store = f"s3://{bucket}/team"
    publish(store, "r10", "sft", tmp_path)
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r10", "--store", store, "--to", "rollouts") == 0
    _, err = capsys.readouterr()
    assert created(fake) == ["r10-rollouts"]
    assert f"already published at {store}/runs/r10/sft/manifest.json" in err


def test_an_unreachable_store_stops_before_any_job(kube, rendered, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r11", "--store", "s3://nowhere/x") == 2
    _, err = capsys.readouterr()
    assert "cannot read s3://nowhere/x/runs/r11/sft/manifest.json" in err and "--no-skip" in err
    assert fake.requests == []


def test_starts_the_job_kubectl_apply_staged(kube, rendered, tmp_path, capsys):
    """`kubectl apply -k` creates the run "demo" Jobs suspended; chain.py starts them."""
    fake = kube()
    staged = next(d for d in yaml.safe_load_all(rendered.read_text())
                  if d["kind"] == "Job" and d["metadata"]["name"] == "demo-sft")
    assert staged["spec"]["suspend"] is True
    fake.stage(staged)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "demo", "--only", "sft") == 0
    _, err = capsys.readouterr()
    assert ("patch", "batch", "jobs", "demo-sft") in fake.requests
    assert created(fake) == []
    assert "starting Job demo-sft (staged by kubectl apply -k)" in err


def test_a_failed_job_is_replaced_when_the_phase_is_rerun(kube, rendered, tmp_path, capsys):
    fail_once = {"broken": True}

    def runtime(job, attempt):
        if job["metadata"]["labels"]["gsm8k.dev/phase"] == "dpo" and fail_once["broken"]:
            return PodRun(lines=["bad data"], exit_code=3)
        return scripted()(job, attempt)

    fake = kube(runtime)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r12", "--from", "dpo") == 1
    fail_once["broken"] = False  # "fix" the problem, then resume as the message says
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r12", "--from", "dpo") == 0
    _, err = capsys.readouterr()
    assert "exit code 3: bad input data" in err
    assert "replacing Job r12-dpo (failed)" in err
    assert ("delete", "batch", "jobs", "r12-dpo") in fake.requests
    assert created(fake) == ["r12-dpo", "r12-dpo", "r12-eval"]


def test_a_completed_job_is_not_rerun(kube, rendered, tmp_path, capsys):
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r13", "--only", "preferences", "--no-skip") == 0
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r13", "--only", "preferences", "--no-skip") == 0
    _, err = capsys.readouterr()
    assert created(fake) == ["r13-preferences"]
    assert "Job r13-preferences already completed" in err


def test_force_replaces_the_job_and_tells_the_phase(kube, rendered, tmp_path, capsys):
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r14", "--only", "eval") == 0
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r14", "--only", "eval", "--force") == 0
    assert created(fake) == ["r14-eval", "r14-eval"]
    env = fake.jobs["r14-eval"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "PIPELINE_FORCE", "value": "true"} in env


def test_a_job_of_another_run_with_the_same_name_is_not_touched(kube, rendered, tmp_path, capsys):
    fake = kube()
    other = next(d for d in yaml.safe_load_all(rendered.read_text()) if d["metadata"]["name"] == "demo-eval")
    other = {**other, "metadata": {**other["metadata"], "name": "r15-eval"}}  # labels still say run "demo"
    fake.stage(other)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r15", "--only", "eval") == 2
    _, err = capsys.readouterr()
    assert "exists but is not phase eval of run r15" in err
    assert not any(verb in ("delete", "patch", "create") for verb, *_ in fake.requests)


def test_the_pods_config_check_really_runs_with_the_run_id_from_the_label(kube, rendered, tmp_path, capsys):
    """The fake kubelet runs each pod's real check-config command as a process, with the
    environment the kubelet would build (ConfigMap, downward-API labels of the Job chain.py
    created, $(VAR) expansion): the run id reaches the CLI through the label alone."""
    import subprocess

    from tests.k8s.test_k8s_manifests import expand, pod_environment

    docs = list(yaml.safe_load_all(rendered.read_text()))

    def runtime(job: dict, attempt: int) -> PodRun:
        (init,) = job["spec"]["template"]["spec"]["initContainers"]
        env = pod_environment(docs, job, init)
        argv = [expand(a, env) for a in init["command"]]

        def check(log) -> int:
            proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=120,
                                  env={**env, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
            for line in (proc.stdout + proc.stderr).splitlines():
                log(line)
            return proc.returncode

        return PodRun(lines=["phase ran"], init_process=check)

    fake = kube(runtime)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r-e2e", "--no-skip") == 0
    out, _ = capsys.readouterr()
    for phase in PHASES:
        assert f"[{phase}] config ok: python -m app {phase}: " in out
    assert out.count("run_id='r-e2e'") == len(PHASES)


# ---------------------------------------------------------------------------------------------
# Sharding rollouts and eval over the pods of an Indexed Job


def test_sharded_rollouts_run_as_an_indexed_job_then_a_merge(kube, rendered, tmp_path, capsys):
    def runtime(job, attempt):
        index = job["_index"]
        return PodRun(lines=[f"{job['metadata']['name']} shard {index}: done"])

    fake = kube(runtime)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r20", "--from", "rollouts", "--to", "preferences",
                     "--shards", "3") == 0
    out, err = capsys.readouterr()
    assert created(fake) == ["r20-rollouts", "r20-rollouts-merge", "r20-preferences"]
    rollouts = fake.jobs["r20-rollouts"]
    assert (rollouts["spec"]["completionMode"], rollouts["spec"]["completions"]) == ("Indexed", 3)
    assert len(rollouts["_pods"]) == 3
    for index in range(3):
        assert f"[rollouts] r20-rollouts shard {index}: done" in out  # every pod's log
    assert "rollouts (3 shards): Job complete" in err and "rollouts merge: Job complete" in err

    from app.cli import parse

    merge = fake.jobs["r20-rollouts-merge"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(merge["containers"][0]["resources"])
    command = merge["containers"][0]["command"]
    name, config = parse(command[3:], environ={"PIPELINE_PRESET": "tiny"})
    assert (name, config.phase, config.num_shards) == ("merge", "rollouts", 3)
    check = merge["initContainers"][0]["command"]
    assert check[-5:] == ["merge", "--phase", "rollouts", "--num-shards", "3"]
    env = {e["name"]: e.get("value") for e in rollouts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PIPELINE_NUM_SHARDS"] == "3"
    assert parse(["rollouts"], environ={"PIPELINE_NUM_SHARDS": "3"})[1].num_shards == 3


def test_a_bad_shard_fails_the_phase_before_the_merge(kube, rendered, tmp_path, capsys):
    def runtime(job, attempt):
        if job["_index"] == 1:
            return PodRun(lines=["shard 1: corrupt input"], exit_code=3)
        return PodRun(lines=[f"shard {job['_index']}: done"], line_delay_s=0.05)

    fake = kube(runtime)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r21", "--only", "eval", "--shards", "2") == 1
    _, err = capsys.readouterr()
    assert created(fake) == ["r21-eval"]
    assert "eval (2 shards) FAILED" in err and "exit code 3" in err


def test_a_published_sharded_phase_skips_the_merge_too(kube, rendered, tmp_path, capsys):
    store = str(tmp_path / "store")
    publish(store, "r22", "eval", tmp_path)
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r22", "--only", "eval", "--shards", "4",
                     "--store", store) == 0
    _, err = capsys.readouterr()
    assert created(fake) == []
    assert "eval (4 shards): skipped" in err and "eval merge: skipped" in err


def test_rounds_run_rollouts_preferences_dpo_again_before_eval(kube, rendered, tmp_path, capsys):
    from app.artifacts import phase_uri
    from app.artifacts import publish as publish_artifact
    from app.cli import parse

    store = str(tmp_path / "store")
    for phase in ("sft", "rollouts", "preferences", "dpo"):
        publish(store, "r30", phase, tmp_path)
    out = tmp_path / "out-r2"
    out.mkdir()
    (out / "result.json").write_text("{}")
    publish_artifact(out, phase_uri(store, "r30", "rollouts", 2), phase="rollouts", config={})  # round 2 half done
    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r30", "--rounds", "3", "--store", store,
                     "--shards", "2") == 0
    _, err = capsys.readouterr()
    assert "round-2/rollouts (2 shards): skipped" in err and "round-2/rollouts merge: skipped" in err
    assert created(fake) == ["r30-preferences-r2", "r30-dpo-r2", "r30-rollouts-r3", "r30-rollouts-merge-r3",
                             "r30-preferences-r3", "r30-dpo-r3", "r30-eval", "r30-eval-merge"]

    def env(name):
        containers = fake.jobs[name]["spec"]["template"]["spec"]
        return [{e["name"]: e.get("value") for e in c.get("env", [])} for c in containers.get("initContainers", []) +
                containers["containers"]]

    # every container of a round's Job (the config check too) is pointed at the round
    assert all(e["PIPELINE_ROUND"] == "3" for e in env("r30-dpo-r3"))
    assert fake.jobs["r30-dpo-r3"]["metadata"]["labels"]["gsm8k.dev/round"] == "3"
    assert all(e["PIPELINE_ROUNDS"] == "3" and "PIPELINE_ROUND" not in e for e in env("r30-eval"))
    assert parse(["dpo"], environ={"PIPELINE_ROUND": "3"})[1].round == 3
    assert parse(["eval"], environ={"PIPELINE_ROUNDS": "3"})[1].evaluated_models()[-1] == "dpo-r3"
    merge = fake.jobs["r30-rollouts-merge-r3"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert merge[-2:] == ["--round", "3"] and parse(merge[3:], environ={})[1].round == 3


# ---------------------------------------------------------------------------------------------
# Dry run, rendering, permissions


def test_dry_run_prints_valid_manifests_and_touches_no_cluster(kube, rendered, tmp_path, capsys):
    import kubernetes_validate

    store = str(tmp_path / "store")
    publish(store, "r16", "sft", tmp_path)
    fake = kube()
    assert run_chain(None, rendered, tmp_path, "--run-id", "r16", "--store", store, "--dry-run") == 0
    out, _ = capsys.readouterr()
    assert "# sft: skipped, already published" in out
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["metadata"]["name"] for d in docs] == [f"r16-{p}" for p in PHASES[1:]]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        assert doc["spec"]["suspend"] is False
    assert fake.requests == []


def test_render_phase_script_gives_one_applyable_job(tmp_path):
    import subprocess

    result = subprocess.run(["bash", str(ROOT / "scripts" / "render-phase.sh"), "h100", "dpo", "exp-7"],
                            capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                            check=True)
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert job["metadata"]["name"] == "exp-7-dpo"
    assert job["spec"]["template"]["metadata"]["labels"]["gsm8k.dev/run"] == "exp-7"
    assert job["spec"]["suspend"] is False
    assert job["metadata"]["namespace"] == "gsm8k"


def test_the_role_grants_exactly_what_the_chain_uses(kube, rendered, role_rules, tmp_path):
    """Least privilege, checked both ways: a scenario that needs every call the chain can
    make (stage, start, fail, replace, stream logs) succeeds under the Role, and the Role
    grants nothing that scenario did not use."""
    fake = kube(scripted({"preferences": [PodRun(exit_code=3)]}))
    staged = next(d for d in yaml.safe_load_all(rendered.read_text()) if d["metadata"]["name"] == "demo-sft")
    fake.stage(staged)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "demo", "--to", "preferences") == 1
    fake.runtime = scripted()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "demo", "--from", "preferences", "--to", "preferences") == 0
    assert fake.denied == []
    assert fake.verbs_used() == role_grants(role_rules)


def test_a_missing_permission_is_reported_not_a_traceback(kube, rendered, role_rules, tmp_path, capsys):
    rules = [r for r in role_rules if r["resources"] != ["pods/log"]]
    fake = kube(rules=rules)
    assert run_chain(fake, rendered, tmp_path, "--run-id", "r17", "--only", "sft") == 2
    _, err = capsys.readouterr()
    assert "403" in err and "pods/log" in err


def test_run_ids_that_make_too_long_job_names_are_refused(rendered, tmp_path, capsys):
    assert run_chain(None, rendered, tmp_path, "--run-id", "r" * 60, "--dry-run", "--no-skip") == 2
    assert "longer than 63 characters" in capsys.readouterr().err


def test_run_ids_with_capitals_dots_and_underscores_get_valid_distinct_job_names(kube, rendered, tmp_path, capsys):
    import re

    fake = kube()
    assert run_chain(fake, rendered, tmp_path, "--run-id", "Exp.1_a", "--only", "sft") == 0
    assert run_chain(fake, rendered, tmp_path, "--run-id", "exp-1-a", "--only", "sft") == 0
    first, second = created(fake)
    assert first != second and second == "exp-1-a-sft"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", first) and len(first) <= 63
    job = fake.jobs[first]
    assert job["metadata"]["labels"]["gsm8k.dev/run"] == "Exp.1_a"  # the label (and PIPELINE_RUN_ID) as given
    assert job["spec"]["template"]["metadata"]["labels"]["gsm8k.dev/run"] == "Exp.1_a"


@pytest.mark.parametrize("run_id", ["abc\n", "a/b", "abc.", "a" * 64])
def test_run_ids_that_are_not_label_values_are_refused_in_one_line(rendered, tmp_path, capsys, run_id):
    with pytest.raises(SystemExit) as stopped:
        run_chain(None, rendered, tmp_path, "--run-id", run_id, "--dry-run", "--no-skip")
    assert stopped.value.code == 2
    assert "--run-id" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    (None, "No such file or directory"),
    ("a: [b\n", "bad.yaml:2:1: not valid YAML"),
    ("- just a list\n", "not Kubernetes manifests"),
])
def test_a_missing_or_broken_rendered_file_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    assert chain.main(["--rendered", str(path), "--run-id", "r1", "--dry-run", "--no-skip"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
