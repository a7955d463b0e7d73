"""Every overlay under k8s/overlays/: renders, validates, is secure, and calls real CLI commands.

    python -m pytest tests/k8s/test_k8s_manifests.py -q

Rendering is real `kubectl kustomize`; schemas are the Kubernetes OpenAPI schemas that
the kubernetes-validate package ships (1.30 and its newest); the Pod Security check below
follows the Pod Security Standards "restricted" profile control by control; each Job's
command is parsed by app.cli.parse with the environment the pod would get.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").exists())
PHASES = ("sft", "rollouts", "preferences", "dpo", "eval")
GPU_PHASES = ("sft", "rollouts", "dpo", "eval")
MULTI_GPU_PHASES = ("sft", "dpo")  # app.launch -> torchrun; rollouts/eval start one engine per GPU themselves
SCHEMA_VERSIONS = ("1.30.0", "1.37.0")


def render(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(ROOT / "k8s" / "overlays" / name) for name in OVERLAYS}


def phase_jobs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["labels"]["gsm8k.dev/phase"]: d for d in docs
            if d["kind"] == "Job" and "gsm8k.dev/phase" in d["metadata"].get("labels", {})}


def config_map(docs: list[dict]) -> dict[str, str]:
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pipeline-config")["data"]


def pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def container(job: dict, name: str = "phase") -> dict:
    spec = job["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def test_overlays_exist():
    assert {"h100", "local"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_pipeline(rendered, overlay):
    docs = rendered[overlay]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Namespace", "gsm8k"), ("ServiceAccount", "pipeline-chain"), ("Role", "pipeline-chain"),
            ("RoleBinding", "pipeline-chain"), ("ConfigMap", "pipeline-config")} <= kinds
    assert sorted(phase_jobs(docs)) == sorted(PHASES)
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"gsm8k"}


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schema(rendered, overlay, version):
    import kubernetes_validate

    for doc in rendered[overlay]:
        # strict: an unknown or misspelt field is an error, not silently dropped.
        kubernetes_validate.validate(doc, version, strict=True)


# ---------------------------------------------------------------------------------------------
# Pod Security Standards, "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards)

RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(template: dict) -> list[str]:
    """Every control of the restricted profile (which includes baseline) that the pod breaks."""
    spec, meta = template["spec"], template.get("metadata", {})
    pod_sc = spec.get("securityContext", {})
    containers = spec.get("initContainers", []) + spec["containers"] + spec.get("ephemeralContainers", [])
    bad = []
    # baseline
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad.append(f"{flag}")
    if pod_sc.get("windowsOptions", {}).get("hostProcess"):
        bad.append("hostProcess")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if kinds - RESTRICTED_VOLUME_TYPES:
            bad.append(f"volume {volume['name']}: type {kinds} not allowed")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']}")
    for key, value in meta.get("annotations", {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value == "unconfined":
            bad.append(f"apparmor annotation {key}")
    if pod_sc.get("appArmorProfile", {}).get("type") == "Unconfined":
        bad.append("pod appArmorProfile Unconfined")
    if pod_sc.get("seLinuxOptions", {}).get("user") or pod_sc.get("seLinuxOptions", {}).get("role"):
        bad.append("pod seLinuxOptions user/role")
    # restricted, pod level
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    for c in containers:
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        added = set(sc.get("capabilities", {}).get("add", []))
        if added - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {added}")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad.append(f"{name}: does not drop ALL capabilities")
        if any(port.get("hostPort") for port in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            bad.append(f"{name}: appArmorProfile Unconfined")
        if sc.get("seLinuxOptions", {}).get("user") or sc.get("seLinuxOptions", {}).get("role"):
            bad.append(f"{name}: seLinuxOptions user/role")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            bad.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile {seccomp!r}")
    return bad


def test_the_restricted_check_catches_what_it_should():
    """The checker itself, on a pod that breaks the rules, so a pass above means something."""
    bad = {"metadata": {}, "spec": {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "image": "x", "securityContext": {"privileged": True,
                                                                      "capabilities": {"add": ["SYS_ADMIN"]}},
                        "ports": [{"containerPort": 80, "hostPort": 80}]}]}}
    found = " | ".join(restricted_violations(bad))
    for expected in ("hostNetwork", "pod runAsUser 0", "hostPath", "privileged", "adds capabilities",
                     "does not drop ALL", "hostPort", "allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile"):
        assert expected in found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_passes_the_restricted_profile(rendered, overlay):
    for name, template in pod_specs(rendered[overlay]):
        assert restricted_violations(template) == [], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_enforces_the_restricted_profile(rendered, overlay):
    (ns,) = [d for d in rendered[overlay] if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hardening_beyond_the_profile(rendered, overlay):
    """Read-only root filesystem, no API token in the pods, resource requests and memory limits."""
    for name, template in pod_specs(rendered[overlay]):
        spec = template["spec"]
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, (name, c["name"])
            assert c["resources"]["requests"].get("cpu") and c["resources"]["requests"].get("memory"), (name, c["name"])
            assert c["resources"]["limits"].get("memory"), (name, c["name"])


SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL|API_KEY)", re.I)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_in_plain_env_or_config_map(rendered, overlay):
    docs = rendered[overlay]
    for key in config_map(docs):
        assert not SECRET_NAME.search(key), f"ConfigMap key {key} looks like a credential"
    for name, template in pod_specs(docs):
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]) or env["name"].startswith("AWS_ACCESS") or \
                        env["name"].startswith("MINIO_ROOT"):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (name, env["name"])
            for source in c.get("envFrom", []):
                assert "configMapRef" in source or "secretRef" in source
    # the S3 credentials the phases use come from a Secret, and only from there
    for job in phase_jobs(docs).values():
        env = {e["name"]: e for e in container(job).get("env", [])}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "pipeline-s3"


# ---------------------------------------------------------------------------------------------
# Job shape


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_phase_job_has_the_batch_policies(rendered, overlay):
    for phase, job in phase_jobs(rendered[overlay]).items():
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        assert job["apiVersion"] == "batch/v1"
        assert pod["restartPolicy"] == "Never"
        assert 0 < spec["backoffLimit"] <= 6
        assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
        assert spec["suspend"] is True  # staged by `kubectl apply -k`; chain.py starts them in order
        rules = spec["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert fail and fail[0]["onExitCodes"]["operator"] == "In" and set(fail[0]["onExitCodes"]["values"]) == {2, 3}
        assert "containerName" not in fail[0]["onExitCodes"]  # the config check (init) counts too
        # labels for pipeline, run and phase on the Job and on its pods
        for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
            assert labels["gsm8k.dev/pipeline"] == "gsm8k-posttrain"
            assert labels["gsm8k.dev/phase"] == phase and labels["gsm8k.dev/run"] == "demo"
        assert job["metadata"]["name"] == f"demo-{phase}"
        # /dev/shm as memory
        dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert dshm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job)["volumeMounts"]
        # config from the ConfigMap; run id from the pod's own label
        assert {"configMapRef": {"name": "pipeline-config"}} in container(job)["envFrom"]
        run_env = next(e for e in container(job)["env"] if e["name"] == "PIPELINE_RUN_ID")
        assert run_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['gsm8k.dev/run']"


def test_h100_overlay_gives_gpu_phases_eight_h100s(rendered):
    jobs = phase_jobs(rendered["h100"])
    gpus = config_map(rendered["h100"])["GPUS_PER_POD"]
    assert gpus == "8"
    for phase in GPU_PHASES:
        pod = jobs[phase]["spec"]["template"]["spec"]
        resources = container(jobs[phase])["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "8"
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert dshm["emptyDir"]["sizeLimit"] == "64Gi"
    # preferences only reads rollouts and writes pairs: it holds no GPU
    assert "nvidia.com/gpu" not in container(jobs["preferences"])["resources"].get("limits", {})


def test_local_overlay_runs_on_cpu_with_minio(rendered):
    docs = rendered["local"]
    for job in phase_jobs(docs).values():
        assert "nvidia.com/gpu" not in str(container(job)["resources"])
        assert container(job)["command"][0] == "python"
    data = config_map(docs)
    assert data["PIPELINE_PRESET"] == "tiny" and data["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert data["PIPELINE_STORE"].startswith("s3://")
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"] == "minio" for d in docs)
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "minio" for d in docs)
    assert any(d["kind"] == "Secret" and d["metadata"]["name"] == "pipeline-s3" for d in docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_multi_gpu_phases_launch_one_worker_per_gpu_of_the_pod(rendered, overlay):
    docs = rendered[overlay]
    gpus = int(config_map(docs)["GPUS_PER_POD"])
    for phase in MULTI_GPU_PHASES:
        job = phase_jobs(docs)[phase]
        c = container(job)
        limit = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        assert gpus == limit, f"GPUS_PER_POD={gpus} but the pod gets {limit} GPUs"
        if limit > 1:
            assert "$(GPUS_PER_POD)" in c["command"]  # follows the ConfigMap, not a copy of the number
            nproc, argv = launched([expand(a, pod_environment(docs, job, c)) for a in c["command"]])
            assert nproc == limit and argv[0] == phase
        else:
            assert c["command"][:3] == ["python", "-m", "app"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_set_by_the_overlay_and_pinned(rendered, overlay):
    for name, template in pod_specs(rendered[overlay]):
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{name}: {image} has no tag"
            assert not image.endswith(":latest"), f"{name}: {image}"


# ---------------------------------------------------------------------------------------------
# The commands the Jobs run exist in the CLI and parse with the pod's environment


def pod_environment(docs: list[dict], job: dict, c: dict) -> dict[str, str]:
    """The variables the kubelet would give container `c`: ConfigMap, then env (Secrets as placeholders)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_map(docs))
    labels = job["spec"]["template"]["metadata"]["labels"]
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            match = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            assert match, path
            env[var["name"]] = labels[match[1]]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = "from-secret"
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def launched(command: list[str]) -> tuple[int, list[str]]:
    """(workers, app argv) of `python -m app.launch --nproc-per-node N <command> ...`, read by its own parser."""
    from app.launch import parse_args

    assert command[:3] == ["python", "-m", "app.launch"], command
    args = parse_args(command[3:])
    return args.nproc_per_node, [args.command, *args.flags]


def app_argv(command: list[str]) -> list[str]:
    """The argv after `-m app` (python -m app ...), or after the launcher's own flags (python -m app.launch ...)."""
    if command[:3] == ["python", "-m", "app.launch"]:
        return launched(command)[1]
    for i in range(len(command) - 1):
        if command[i] == "-m" and command[i + 1] == "app":
            return command[i + 2:]
    raise AssertionError(f"{command} does not run `-m app`")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_job_command_parses_with_the_cli(rendered, overlay):
    from app.cli import COMMANDS, parse

    docs = rendered[overlay]
    for phase, job in phase_jobs(docs).items():
        c = container(job)
        env = pod_environment(docs, job, c)
        command = [expand(a, env) for a in c["command"] + c.get("args", [])]
        argv = app_argv(command)
        assert argv[0] == phase and argv[0] in COMMANDS
        name, config = parse(argv, environ=env)
        assert name == phase
        assert config.run_id == "demo" and config.store == config_map(docs)["PIPELINE_STORE"]
        assert config.preset == config_map(docs)["PIPELINE_PRESET"]
        if command[:3] == ["python", "-m", "app.launch"]:
            assert launched(command)[0] == int(c["resources"]["limits"]["nvidia.com/gpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_check_runs_the_phase_own_parser(rendered, overlay, tmp_path):
    """Run each Job's check-config init container command here, as the kubelet would:
    exit 0 with the overlay's config, exit 2 (FailJob) with a broken one."""
    docs = rendered[overlay]
    for phase, job in phase_jobs(docs).items():
        c = container(job, "check-config")
        env = pod_environment(docs, job, c)
        argv = [expand(a, env) for a in c["command"]]
        assert argv[0] == "python"
        base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
        ok = subprocess.run([sys.executable, *argv[1:]], env={**base, **env}, capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith(f"config ok: python -m app {phase}")
        bad = subprocess.run([sys.executable, *argv[1:]], env={**base, **env, "PIPELINE_RUN_ID": "not/valid"},
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert bad.returncode == 2, bad.stderr
        assert "config error: --run-id 'not/valid'" in bad.stderr
        break  # one phase per overlay: the script is shared; the parse test covers every phase


def test_the_chain_script_knows_the_same_phases_as_the_app():
    import importlib.util

    from app.phases import PHASES as APP_PHASES

    assert APP_PHASES == PHASES
    spec = importlib.util.spec_from_file_location("chain", ROOT / "scripts" / "chain.py")
    chain = importlib.util.module_from_spec(spec)
    sys.modules["chain"] = chain  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(chain)
    finally:
        del sys.modules["chain"]
    assert chain.PHASES is APP_PHASES  # the chaining script runs the app's own list, not a copy


# ---------------------------------------------------------------------------------------------
# The image and the pods agree on the user and the writable paths


def dockerfile_env(stage: str) -> dict[str, str]:
    """The ENV of a Dockerfile stage (continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    env = {}
    for line in body.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[key] = value
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_the_image_writes_is_a_mounted_volume(rendered, overlay):
    env = dockerfile_env("gpu")
    writable = [env[k] for k in ("HOME", "HF_HOME", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR",
                                 "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "PIPELINE_CACHE", "PIPELINE_WORKDIR")] + ["/tmp"]
    for job in phase_jobs(rendered[overlay]).values():
        mounts = [m["mountPath"] for m in container(job)["volumeMounts"] if not m.get("readOnly")]
        for path in writable:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (path, mounts)


def test_pods_run_as_the_image_user(rendered):
    text = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^USER (\S+)$", text, re.M) == ["1000:1000", "1000:1000"]
    for docs in rendered.values():
        for job in phase_jobs(docs).values():
            sc = job["spec"]["template"]["spec"]["securityContext"]
            assert (sc["runAsUser"], sc["runAsGroup"]) == (1000, 1000)
