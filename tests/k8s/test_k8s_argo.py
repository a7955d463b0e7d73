"""The Argo WorkflowTemplate (k8s/argo): its order, gates, security, and its check script run for real.

    python -m pytest tests/k8s/test_k8s_argo.py -q

No Argo controller runs in the tests: the template is rendered by kubectl kustomize, each step's
container is validated as a Kubernetes Pod (1.30 schema) and checked against the
restricted profile, the phase commands are parsed by app.cli.parse, and the "check"
step's Python script is executed against a real local store.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.phases import PHASES
from tests.k8s.test_k8s_manifests import SECRET_NAME, app_argv, launched, render, restricted_violations

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template() -> dict:
    docs = render(ROOT / "k8s" / "argo")
    (wft,) = [d for d in docs if d["kind"] == "WorkflowTemplate"]
    assert wft["apiVersion"] == "argoproj.io/v1alpha1" and wft["metadata"]["namespace"] == "gsm8k"
    return wft


@pytest.fixture(scope="module")
def h100_config() -> dict[str, str]:
    docs = render(ROOT / "k8s" / "overlays" / "h100")
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]


def templates(wft: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wft["spec"]["templates"]}


def params(wft: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in wft["spec"]["arguments"]["parameters"]}


def test_phases_run_in_order_each_behind_its_check(template):
    steps = [group[0] for group in templates(template)["pipeline"]["steps"]]
    expected = [name for phase in PHASES for name in (f"check-{phase}", phase)]
    expected.insert(expected.index("check-eval"), "later-rounds")  # rounds 2..N of preference training
    assert [s["name"] for s in steps] == expected
    for step in steps:
        if step["name"] == "later-rounds":
            assert step["template"] == "round" and step["arguments"]["parameters"] == [{"name": "round", "value": "2"}]
            assert step["when"] == "{{workflow.parameters.rounds}} >= 2"
        elif step["name"].startswith("check-"):
            assert step["template"] == "check"
            assert step["arguments"]["parameters"] == [{"name": "phase", "value": step["name"][6:]}]
        else:
            assert step["template"] == step["name"]
            assert step["when"] == f"{{{{steps.check-{step['name']}.outputs.result}}}} == run"
    (start,) = [p for p in template["spec"]["arguments"]["parameters"] if p["name"] == "from"]
    assert start["enum"] == list(PHASES) and start["value"] == PHASES[0]


def test_steps_retry_crashes_but_not_config_or_input_errors(template):
    for name in ("check", *PHASES):
        retry = templates(template)[name]["retryStrategy"]
        assert retry["limit"] == "2" and retry["retryPolicy"] == "Always"
        assert retry["expression"] == "asInt(lastRetry.exitCode) != 2 && asInt(lastRetry.exitCode) != 3"


def pod_of(wft: dict, tmpl: dict) -> dict:
    """The pod Argo would create for a step (its main container; Argo adds its own sidecars)."""
    body = dict(tmpl.get("container") or tmpl["script"])
    body.pop("source", None)
    body["name"] = "main"
    spec = {"containers": [body], "securityContext": wft["spec"]["securityContext"],
            "volumes": wft["spec"]["volumes"], "restartPolicy": "Never",
            "automountServiceAccountToken": wft["spec"]["automountServiceAccountToken"]}
    for key in ("nodeSelector", "tolerations"):
        if key in tmpl:
            spec[key] = tmpl[key]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": tmpl["name"]}, "spec": spec}


def test_every_step_is_a_valid_restricted_pod(template):
    import kubernetes_validate

    for name in ("check", *PHASES):
        pod = pod_of(template, templates(template)[name])
        pod["spec"]["containers"][0]["image"] = params(template)["image"]
        kubernetes_validate.validate(pod, "1.30.0", strict=True)
        assert restricted_violations({"metadata": {}, "spec": pod["spec"]}) == [], name
        for env in pod["spec"]["containers"][0]["env"]:
            if SECRET_NAME.search(env["name"]):
                assert "secretKeyRef" in env["valueFrom"], env


def test_gpu_phases_take_eight_h100s_and_the_launcher_uses_them(template):
    for phase in ("sft", "rollouts", "dpo", "eval"):
        tmpl = templates(template)[phase]
        resources = tmpl["container"]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "8"
        assert tmpl["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    for phase in ("sft", "dpo"):
        nproc, argv = launched(templates(template)[phase]["container"]["command"])
        assert nproc == 8 and argv[:1] == [phase] and argv[1:] in ([], ["--round", "{{inputs.parameters.round}}"])
    assert "nvidia.com/gpu" not in str(templates(template)["preferences"]["container"]["resources"])


def test_phase_commands_parse_with_the_cli(template, h100_config):
    from app.cli import COMMANDS, parse

    run_id = params(template)["run-id"]
    for phase in PHASES:
        container = templates(template)[phase]["container"]
        argv = app_argv(container["command"])
        if "--round" in argv:  # rollouts, preferences, dpo: the round's parameter, 1 by default
            assert argv[-2:] == ["--round", "{{inputs.parameters.round}}"]
            assert templates(template)[phase]["inputs"]["parameters"] == [{"name": "round", "value": "1"}]
            argv = argv[:-2]
        assert argv == [phase] and phase in COMMANDS
        env = {**h100_config, "PIPELINE_RUN_ID": run_id, "PIPELINE_FORCE": params(template)["force"]}
        name, config = parse(argv, environ=env)
        assert (name, config.run_id, config.preset) == (phase, run_id, "abel-7b")


def test_a_round_runs_rollouts_preferences_dpo_at_its_round_then_the_next(template):
    from app.phases import ROUND_PHASES

    steps = [group[0] for group in templates(template)["round"]["steps"]]
    assert [s["name"] for s in steps] == [n for p in ROUND_PHASES for n in (f"check-{p}", p)] + ["next-round"]
    here = {"name": "round", "value": "{{inputs.parameters.round}}"}
    for step in steps[:-1]:
        assert here in step["arguments"]["parameters"]
    assert steps[-1]["template"] == "round"
    assert steps[-1]["arguments"]["parameters"] == [{"name": "round", "value": "{{=asInt(inputs.parameters.round) + 1}}"}]
    assert steps[-1]["when"] == "{{inputs.parameters.round}} < {{workflow.parameters.rounds}}"
    assert params(template)["rounds"] == "1"


# ---------------------------------------------------------------------------------------------
# The check step's script, run here


def run_check(template, tmp_path, phase: str, *, start="sft", force="false", run_id="exp1", store=None, round=1,
              rounds=1):
    source = templates(template)["check"]["script"]["source"]
    source = source.replace("{{inputs.parameters.phase}}", phase).replace("{{workflow.parameters.from}}", start)
    source = source.replace("{{inputs.parameters.round}}", str(round)).replace("{{workflow.parameters.rounds}}", str(rounds))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "PIPELINE_STORE": store or str(tmp_path / "store"), "PIPELINE_PRESET": "tiny",
           "PIPELINE_RUN_ID": run_id, "PIPELINE_FORCE": force}
    return subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


def test_check_runs_an_unpublished_phase(template, tmp_path):
    result = run_check(template, tmp_path, "sft")
    assert result.returncode == 0 and result.stdout == "run\n", result.stderr


def test_check_skips_a_published_phase(template, tmp_path):
    from app.artifacts import phase_uri, publish

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"w")
    publish(out, phase_uri(str(tmp_path / "store"), "exp1", "rollouts"), phase="rollouts", config={})
    result = run_check(template, tmp_path, "rollouts")
    assert result.returncode == 0 and result.stdout == "skip\n"
    assert "already published" in result.stderr
    assert run_check(template, tmp_path, "rollouts", force="true").stdout == "run\n"
    assert run_check(template, tmp_path, "preferences").stdout == "run\n"


def test_check_skips_phases_before_the_resume_point(template, tmp_path):
    assert run_check(template, tmp_path, "sft", start="dpo").stdout == "skip\n"
    assert run_check(template, tmp_path, "dpo", start="dpo").stdout == "run\n"


def test_check_reads_each_rounds_own_place(template, tmp_path):
    from app.artifacts import phase_uri, publish

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"w")
    publish(out, phase_uri(str(tmp_path / "store"), "exp1", "dpo", 2), phase="dpo", config={})
    assert run_check(template, tmp_path, "dpo", round=2, rounds=3).stdout == "skip\n"
    assert run_check(template, tmp_path, "dpo", round=3, rounds=3).stdout == "run\n"
    assert run_check(template, tmp_path, "dpo", rounds=3).stdout == "run\n"  # round 1 is not published
    # resuming at dpo still runs the later rounds; resuming at eval skips them
    assert run_check(template, tmp_path, "rollouts", start="dpo", round=3, rounds=3).stdout == "run\n"
    assert run_check(template, tmp_path, "rollouts", start="eval", round=3, rounds=3).stdout == "skip\n"


def test_check_fails_fast_on_a_config_error(template, tmp_path):
    result = run_check(template, tmp_path, "dpo", run_id="bad run")
    assert result.returncode == 2
    assert "config error: --run-id 'bad run'" in result.stderr


def test_the_argo_rbac_validates_and_grants_only_task_results():
    import kubernetes_validate

    docs = render(ROOT / "k8s" / "argo")
    for doc in docs:
        if doc["kind"] != "WorkflowTemplate":
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                              "verbs": ["create", "patch"]}]
