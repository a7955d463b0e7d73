"""Run the pipeline's phases in order on Kubernetes: one Job per phase, for one run id.

    python scripts/chain.py --overlay h100 --run-id exp1              # sft -> rollouts -> preferences -> dpo -> eval
    python scripts/chain.py --overlay h100 --run-id exp1 --from dpo   # resume at dpo
    python scripts/chain.py --overlay h100 --run-id exp1 --dry-run    # print the Jobs it would create
    python scripts/chain.py --overlay local --run-id exp1 --only sft  # one phase
    python scripts/chain.py --overlay h100 --run-id exp1 --rounds 2   # a second round of preference training

With `--rounds N`, rollouts -> preferences -> dpo run again N-1 times after the first DPO,
before eval: round r's Jobs are `<run-id>-<phase>-r<r>` with PIPELINE_ROUND=r (they sample
from and train on round r-1's DPO adapter; artifacts under `<store>/runs/<run-id>/round-<r>/`),
and the eval Job gets PIPELINE_ROUNDS=N so it reports every round.

For each phase, in order:
  1. skip it when its artifact is already published: `manifest.json` exists under
     `<store>/runs/<run-id>/<phase>/` (read with app.artifacts, from this machine, with the
     AWS_* variables of this shell: the store is the ConfigMap's PIPELINE_STORE);
  2. otherwise create its Job from the rendered overlay (`kubectl kustomize`), renamed to
     `<run-id>-<phase>` and labelled with the run id, or start the Job `kubectl apply -k`
     staged suspended, or attach to the Job if it is already running;
  3. stream its pods' logs and wait for the Job to be Complete or Failed;
  4. stop at the first failure with the reason, the exit code's meaning and the command
     that resumes from that phase.

Interrupting (Ctrl-C) leaves the running Job alone; the same command reattaches to it.
It needs the ServiceAccount/Role in k8s/base/rbac.yaml, or equivalent rights, and
kubectl (for `kubectl kustomize`) unless --rendered points at pre-rendered YAML.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.artifacts import MANIFEST, join, phase_uri, read_manifest  # noqa: E402
from app.log import redact  # noqa: E402
from app.phases import PHASES, SHARDED, run_steps, step_name  # noqa: E402

PHASE_LABEL = "gsm8k.dev/phase"
RUN_LABEL = "gsm8k.dev/run"
STEP_LABEL = "gsm8k.dev/step"
ROUND_LABEL = "gsm8k.dev/round"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
MAIN_CONTAINER = "phase"
CONFIG_MAP = "pipeline-config"

# app/errors.py, plus what the kernel and the kubelet add.
EXIT_MEANING = {
    1: "a crash or a storage hiccup (retried up to backoffLimit)",
    2: "a config or usage error: a retry cannot fix it",
    3: "bad input data or a corrupt/missing input artifact: a retry cannot fix it",
    137: "killed (SIGKILL): usually out of memory, or the deadline",
    143: "terminated (SIGTERM): preempted, evicted or deleted",
}
# Container states that leave a pod Pending until someone acts; worth a hint.
WAITING_HINTS = {
    "CreateContainerConfigError": "a Secret or ConfigMap the pod reads is missing "
                                  "(kubectl -n {ns} get secret pipeline-s3 configmap pipeline-config)",
    "ErrImagePull": "the image cannot be pulled: check the overlay's `images:` and the registry credentials",
    "ImagePullBackOff": "the image cannot be pulled: check the overlay's `images:` and the registry credentials",
    "InvalidImageName": "the overlay's image name is invalid",
}


class ChainError(Exception):
    """A problem that stops the chain before or between phases (printed as one line)."""


def say(message: str) -> None:
    print(f"[chain] {redact(message)}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Manifests: render the overlay, pick each phase's Job, make it this run's.


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` of an overlay name (k8s/overlays/<name>) or directory."""
    path = Path(overlay)
    if not path.is_dir():
        path = ROOT / "k8s" / "overlays" / overlay
    if not path.is_dir():
        raise ChainError(f"no overlay {overlay!r} (looked for {path})")
    try:
        out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise ChainError("kubectl is not installed; render elsewhere and pass --rendered FILE") from None
    except subprocess.CalledProcessError as exc:
        raise ChainError(f"kubectl kustomize {path} failed:\n{exc.stderr}") from None
    return [doc for doc in yaml.safe_load_all(out) if doc]


def read_rendered(path: str) -> list[dict]:
    """The documents of a file that `kubectl kustomize` wrote; a missing file or bad YAML is one line."""
    try:
        docs = [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]
    except OSError as exc:
        raise ChainError(f"--rendered {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ChainError(f"--rendered {path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not all(isinstance(doc, dict) for doc in docs):
        raise ChainError(f"--rendered {path}: not Kubernetes manifests (a document is not a mapping)")
    return docs


def phase_jobs(docs: list[dict]) -> dict[str, dict]:
    jobs = {}
    for doc in docs:
        if doc.get("kind") == "Job" and PHASE_LABEL in doc["metadata"].get("labels", {}):
            jobs[doc["metadata"]["labels"][PHASE_LABEL]] = doc
    missing = [p for p in PHASES if p not in jobs]
    if missing:
        raise ChainError(f"the rendered manifests have no Job for {', '.join(missing)}")
    return jobs


def pipeline_config(docs: list[dict]) -> dict[str, str]:
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == CONFIG_MAP:
            return doc.get("data", {})
    raise ChainError(f"the rendered manifests have no ConfigMap {CONFIG_MAP}")


def job_name(run_id: str, phase: str) -> str:
    """`<run-id>-<phase>`, as a DNS-1123 label (an Indexed Job's pods take their hostnames from it):
    lowercase, '.' and '_' become '-'; a run id that had to change gets a short hash of itself
    appended, so `Exp.1` and `exp-1` never share Jobs. The run label keeps the run id as it is."""
    slug = re.sub(r"[^a-z0-9-]", "-", run_id.lower())
    if slug != run_id:
        slug += "-" + hashlib.sha256(run_id.encode()).hexdigest()[:6]
    name = f"{slug}-{phase}"
    if len(name) > 63:  # a Job's name is also a label value on its pods
        raise ChainError(f"Job name {name!r} is longer than 63 characters; use a shorter --run-id")
    return name


def for_run(job: dict, run_id: str, *, force: bool = False) -> dict:
    """The phase's Job for this run: its name and run labels (PIPELINE_RUN_ID follows the
    pod's label through the downward API), started rather than staged."""
    job = copy.deepcopy(job)
    phase = job["metadata"]["labels"][PHASE_LABEL]
    job["metadata"]["name"] = job_name(run_id, phase)
    job["metadata"]["labels"][RUN_LABEL] = run_id
    job["spec"]["template"]["metadata"]["labels"][RUN_LABEL] = run_id
    job["spec"]["suspend"] = False
    job.pop("status", None)
    if force:
        for container in job["spec"]["template"]["spec"]["containers"]:
            if container["name"] == MAIN_CONTAINER:
                container.setdefault("env", []).append({"name": "PIPELINE_FORCE", "value": "true"})
    return job


def with_env(job: dict, name: str, value: str) -> dict:
    """`job` with the variable set in every container (the config check's too)."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    for container in pod.get("initContainers", []) + pod["containers"]:
        container.setdefault("env", []).append({"name": name, "value": value})
    return job


def sharded(job: dict, shards: int) -> dict:
    """The phase as an Indexed Job of `shards` pods at once: pod i writes shard i of N (the
    CLI reads JOB_COMPLETION_INDEX, which Kubernetes sets in an Indexed Job's pods)."""
    job = with_env(job, "PIPELINE_NUM_SHARDS", str(shards))
    spec = job["spec"]
    # Retries are shared by all the pods, so scale them with the pod count.
    spec.update(completionMode="Indexed", completions=shards, parallelism=shards,
                backoffLimit=spec.get("backoffLimit", 2) * shards)
    return job


def in_round(job: dict, run_id: str, round: int) -> dict:
    """The phase's Job for round `round` >= 2 of preference training: its own name and label, and
    PIPELINE_ROUND, which points the phase at that round's place in the store."""
    job = with_env(job, "PIPELINE_ROUND", str(round))
    phase = job["metadata"]["labels"][PHASE_LABEL]
    job["metadata"]["name"] = job_name(run_id, f"{phase}-r{round}")
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        labels[ROUND_LABEL] = str(round)
    return job


def merge_job(cpu_job: dict, phase: str, run_id: str, shards: int, round: int = 1) -> dict:
    """A small CPU Job, made from the preferences Job (which holds no GPU), that joins the
    shards into the phase's artifact: `python -m app merge --phase P --num-shards N`."""
    job = copy.deepcopy(cpu_job)
    argv = ["merge", "--phase", phase, "--num-shards", str(shards)] + (["--round", str(round)] if round > 1 else [])
    job["metadata"]["name"] = job_name(run_id, f"{phase}-merge" if round <= 1 else f"{phase}-merge-r{round}")
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        labels.update({PHASE_LABEL: phase, STEP_LABEL: "merge"})
    pod = job["spec"]["template"]["spec"]
    for container in pod.get("initContainers", []):
        if "$(PHASE)" in container.get("command", []):  # the config check parses the merge command
            container["command"] = [arg for arg in container["command"] if arg != "$(PHASE)"] + argv
    main = next(c for c in pod["containers"] if c["name"] == MAIN_CONTAINER)
    main["command"] = ["python", "-m", "app", *argv]
    main.pop("args", None)
    return job


# ---------------------------------------------------------------------------------------------
# The plan: which phases run, which are skipped because the store already has them.


@dataclass
class Step:
    phase: str
    job: dict
    skip_reason: str | None = None
    title: str = ""  # how messages name the step (default: the phase)

    def __post_init__(self):
        self.title = self.title or self.phase


def plan(jobs: dict[str, dict], run_id: str, store: str, *, start: str, stop: str, check_store: bool,
         force: bool, shards: int = 1, rounds: int = 1) -> list[Step]:
    if PHASES.index(start) > PHASES.index(stop):
        raise ChainError(f"--from {start} comes after --to {stop}")
    steps = []
    for phase, round in run_steps(rounds, start, stop):
        job = for_run(jobs[phase], run_id, force=force)
        if round > 1:
            job = in_round(job, run_id, round)
        if phase == "eval" and rounds > 1:
            job = with_env(job, "PIPELINE_ROUNDS", str(rounds))
        title = step_name((phase, round))
        if shards > 1 and phase in SHARDED:
            phase_steps = [Step(phase, sharded(job, shards), title=f"{title} ({shards} shards)"),
                           Step(phase, merge_job(for_run(jobs["preferences"], run_id, force=force), phase, run_id,
                                                 shards, round), title=f"{title} merge")]
        else:
            phase_steps = [Step(phase, job, title=title)]
        steps.extend(phase_steps)
        if check_store and not force:
            uri = phase_uri(store, run_id, phase, round)
            try:
                manifest = read_manifest(uri)
            except Exception as exc:  # noqa: BLE001 - any store failure ends the chain with its message
                raise ChainError(f"cannot read {join(uri, MANIFEST)} to decide whether {phase} is done: {exc}\n"
                                 "  set AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the store, "
                                 "or pass --no-skip") from None
            if manifest is not None:
                for skipped in phase_steps:
                    skipped.skip_reason = (f"already published at {join(uri, MANIFEST)} (created "
                                           f"{manifest.get('created_at', '?')}, config {manifest.get('config_hash', '?')})")
    return steps


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the config check's script) as `|` blocks, as in the source YAML."""


_BlockDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def print_dry_run(steps: list[Step], out=None) -> None:
    """YAML that `kubectl apply -f -` accepts: one document per Job to create, comments for the rest."""
    out = out or sys.stdout
    for step in steps:
        if step.skip_reason:
            out.write(f"# {step.title}: skipped, {step.skip_reason}\n")
            continue
        out.write(f"---\n# {step.title}: Job {step.job['metadata']['name']}\n")
        out.write(yaml.dump(step.job, Dumper=_BlockDumper, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# The cluster: create or start a phase's Job, stream its logs, wait for it to end.


@dataclass
class Outcome:
    ok: bool
    reason: str = ""
    message: str = ""
    exit_code: int | None = None


@dataclass
class Cluster:
    namespace: str
    poll_seconds: float = 5.0
    out: object = None  # default: sys.stdout at the time of writing
    batch: object = None
    core: object = None
    _printed: dict = field(default_factory=dict)

    @classmethod
    def connect(cls, namespace: str, kubeconfig: str | None, context: str | None, **kwargs) -> "Cluster":
        from kubernetes import client, config

        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
        except config.ConfigException:
            try:
                config.load_incluster_config()
            except config.ConfigException as exc:
                raise ChainError(f"no kubeconfig and not in a cluster: {exc}") from None
        return cls(namespace, batch=client.BatchV1Api(), core=client.CoreV1Api(), **kwargs)

    # -- Jobs

    def read_job(self, name: str):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.batch.read_namespaced_job(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def replace_job(self, name: str) -> None:
        self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")
        deadline = time.monotonic() + 300
        while self.read_job(name) is not None:
            if time.monotonic() > deadline:
                raise ChainError(f"Job {name} is still being deleted after 5 minutes")
            time.sleep(self.poll_seconds)

    def start(self, step: Step, *, force: bool) -> None:
        """Create the phase's Job, or reuse the one already there when that is right."""
        name = step.job["metadata"]["name"]
        existing = self.read_job(name)
        if existing is not None:
            labels = existing.metadata.labels or {}
            wanted = step.job["metadata"]["labels"]
            if labels.get(PHASE_LABEL) != wanted[PHASE_LABEL] or labels.get(RUN_LABEL) != wanted[RUN_LABEL]:
                raise ChainError(f"a Job named {name} exists but is not phase {step.phase} of run "
                                 f"{wanted[RUN_LABEL]} (labels {labels}); delete it or pick another run id")
            state = job_state(existing)
            if state == "running":
                say(f"{step.title}: Job {name} is already running; attaching to it")
                return
            if state == "suspended" and not force:
                say(f"{step.title}: starting Job {name} (staged by kubectl apply -k)")
                self.batch.patch_namespaced_job(name, self.namespace, {"spec": {"suspend": False}})
                return
            if state == "complete" and not force:
                say(f"{step.title}: Job {name} already completed")
                return
            say(f"{step.title}: replacing Job {name} ({state}{', --force' if force else ''})")
            self.replace_job(name)
        say(f"{step.title}: creating Job {name}")
        self.batch.create_namespaced_job(self.namespace, step.job)

    # -- Pods and logs

    def pods(self, job: str) -> list:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={job}").items
        return sorted(pods, key=lambda p: (p.metadata.creation_timestamp or 0, p.metadata.name))

    def stream_logs(self, pod: str, container: str, phase: str, *, follow: bool) -> bool:
        """Print the container's log lines not printed yet; True once the stream ended normally."""
        from kubernetes.client.exceptions import ApiException

        key = (pod, container)
        skip = self._printed.get(key, 0)
        try:
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=container, follow=follow,
                                                     _preload_content=False)
        except ApiException as exc:
            if exc.status in (400, 404):  # not started yet / already gone
                return False
            raise
        seen, buffer = 0, b""
        try:
            for chunk in resp.stream(4096, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    seen += 1
                    if seen > skip:
                        self._emit(phase, line)
            if buffer:
                seen += 1
                if seen > skip:
                    self._emit(phase, buffer)
        except Exception as exc:  # noqa: BLE001 - a dropped stream is picked up again on the next poll
            say(f"{phase}: log stream of {pod} broke ({exc}); resuming")
            return False
        finally:
            self._printed[key] = max(skip, seen)
            resp.release_conn()
        return True

    def _emit(self, phase: str, line: bytes) -> None:
        out = self.out or sys.stdout
        out.write(f"[{phase}] {line.decode('utf-8', 'replace')}\n")
        out.flush()

    # -- Waiting

    def follow(self, step: Step) -> Outcome:
        name = step.job["metadata"]["name"]
        done_pods: set[str] = set()
        init_printed: set[str] = set()
        status_seen: dict[str, str] = {}
        while True:
            job = self.read_job(name)
            if job is None:
                raise ChainError(f"Job {name} disappeared while it ran (deleted, or its TTL expired)")
            for pod in self.pods(name):
                pod_name = pod.metadata.name
                if pod_name in done_pods:
                    continue
                status = describe_pod(pod, self.namespace)
                if status and status_seen.get(pod_name) != status:
                    status_seen[pod_name] = status
                    say(f"{step.title}: pod {pod_name}: {status}")
                for init in (pod.status.init_container_statuses or []) if pod.status else []:
                    if init.state and init.state.terminated and (pod_name, init.name) not in init_printed:
                        if self.stream_logs(pod_name, init.name, step.phase, follow=False):
                            init_printed.add((pod_name, init.name))
                main = container_status(pod, MAIN_CONTAINER)
                started = main is not None and main.state is not None and (main.state.running or main.state.terminated)
                if started:
                    ended = self.stream_logs(pod_name, MAIN_CONTAINER, step.phase, follow=True)
                    if ended and pod_finished(pod, self.core, self.namespace):
                        done_pods.add(pod_name)
                elif pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
                    done_pods.add(pod_name)  # ended before its main container started (init failed)
            state = job_state(job)
            if state == "complete":
                return Outcome(True)
            if state == "failed":
                return failure(job, self.pods(name))
            time.sleep(self.poll_seconds)


def job_state(job) -> str:
    conditions = {c.type: c.status for c in (job.status.conditions or [])} if job.status else {}
    if conditions.get("Complete") == "True":
        return "complete"
    if conditions.get("Failed") == "True":
        return "failed"
    if job.spec.suspend:
        return "suspended"
    return "running"


def container_status(pod, name: str):
    statuses = (pod.status.container_statuses or []) if pod.status else []
    return next((s for s in statuses if s.name == name), None)


def pod_finished(pod, core, namespace: str) -> bool:
    """Whether the pod's main container has ended; re-read, since its log stream just ended."""
    job = (pod.metadata.labels or {}).get(JOB_NAME_LABEL, "")
    fresh = [p for p in core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={job}").items
             if p.metadata.name == pod.metadata.name]
    if not fresh:
        return True
    status = container_status(fresh[0], MAIN_CONTAINER)
    return fresh[0].status.phase in ("Succeeded", "Failed") or bool(status and status.state and status.state.terminated)


def describe_pod(pod, namespace: str) -> str:
    """A one-line account of a pod that is not simply running: why it waits, or how it ended."""
    status = pod.status
    if status is None:
        return ""
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return f"Pending, not scheduled: {cond.reason}: {cond.message}"
        if cond.type == "DisruptionTarget" and cond.status == "True":
            return f"disrupted ({cond.reason}: {cond.message}); the Job retries without counting it"
    for cs in (status.init_container_statuses or []) + (status.container_statuses or []):
        waiting = cs.state.waiting if cs.state else None
        if waiting and waiting.reason in WAITING_HINTS:
            return f"{waiting.reason}: {waiting.message or ''} -> {WAITING_HINTS[waiting.reason].format(ns=namespace)}"
        terminated = cs.state.terminated if cs.state else None
        if terminated and terminated.exit_code:
            meaning = EXIT_MEANING.get(terminated.exit_code, "")
            return f"container {cs.name} exited with code {terminated.exit_code}" + (f" ({meaning})" if meaning else "")
    return status.phase or ""


def failure(job, pods) -> Outcome:
    failed = next((c for c in job.status.conditions if c.type == "Failed" and c.status == "True"), None)
    exit_code = None
    for pod in reversed(pods):
        for cs in ((pod.status.container_statuses or []) + (pod.status.init_container_statuses or [])
                   if pod.status else []):
            if cs.state and cs.state.terminated and cs.state.terminated.exit_code:
                exit_code = cs.state.terminated.exit_code
                break
        if exit_code is not None:
            break
    return Outcome(False, reason=failed.reason or "", message=failed.message or "", exit_code=exit_code)


# ---------------------------------------------------------------------------------------------
# The command line.


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/chain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--overlay", help="overlay name under k8s/overlays/ (h100, local, local-gpu) or a directory")
    source.add_argument("--rendered", help="a file with the overlay already rendered (kubectl kustomize > FILE)")
    parser.add_argument("--run-id", required=True, help="the run's id, a Kubernetes label value: letters, digits, "
                        "'.', '_' and '-', at most 63 characters (Job names are its lowercase form)")
    parser.add_argument("--from", dest="start", choices=PHASES, default=PHASES[0], help="first phase to run")
    parser.add_argument("--to", dest="stop", choices=PHASES, default=PHASES[-1], help="last phase to run")
    parser.add_argument("--only", choices=PHASES, help="run just this phase (= --from P --to P)")
    parser.add_argument("--dry-run", action="store_true", help="print the Jobs it would create; touch no cluster")
    parser.add_argument("--no-skip", action="store_true",
                        help="do not read the store; run every selected phase (each phase still skips "
                             "itself when its artifact is current)")
    parser.add_argument("--force", action="store_true",
                        help="redo the selected phases: replace their Jobs and set PIPELINE_FORCE=true")
    parser.add_argument("--shards", type=int, default=1,
                        help="run rollouts and eval as Indexed Jobs of N pods (one shard each), each followed by "
                             "a CPU Job `python -m app merge --phase P --num-shards N`")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of preference training: after the first DPO, rollouts -> preferences -> dpo "
                             "N-1 more times from the latest policy (Jobs <run-id>-<phase>-r<r>), then eval of every round")
    parser.add_argument("--store", help="artifact store to check (default: the ConfigMap's PIPELINE_STORE)")
    parser.add_argument("--namespace", help="namespace (default: the rendered Jobs' namespace)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config, "
                                             "then the in-cluster ServiceAccount)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--poll-seconds", type=float, default=5.0, help="how often to poll the Job and its pods")
    args = parser.parse_args(argv)
    if args.only:
        args.start = args.stop = args.only
    from app.config import RUN_ID_PATTERN, RUN_ID_RULE

    if not RUN_ID_PATTERN.fullmatch(args.run_id):
        parser.error(f"--run-id {args.run_id!r}: use {RUN_ID_RULE}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.rendered:
            docs = read_rendered(args.rendered)
        else:
            docs = render(args.overlay)
        jobs = phase_jobs(docs)
        store = args.store or pipeline_config(docs).get("PIPELINE_STORE")
        if not store and not args.no_skip:
            raise ChainError("no PIPELINE_STORE in the ConfigMap; pass --store or --no-skip")
        if args.shards < 1:
            raise ChainError("--shards must be at least 1")
        if args.rounds < 1:
            raise ChainError("--rounds must be at least 1")
        steps = plan(jobs, args.run_id, store, start=args.start, stop=args.stop, check_store=not args.no_skip,
                     force=args.force, shards=args.shards, rounds=args.rounds)
        if args.dry_run:
            print_dry_run(steps)
            return 0
        namespace = args.namespace or jobs[PHASES[0]]["metadata"].get("namespace") or "default"
        cluster = Cluster.connect(namespace, args.kubeconfig, args.context, poll_seconds=args.poll_seconds)
        return run(cluster, steps, args)
    except ChainError as exc:
        say(f"error: {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - the API server's refusal, said in one line
        from kubernetes.client.exceptions import ApiException

        if not isinstance(exc, ApiException):
            raise
        say(f"error: the Kubernetes API answered {exc.status} {exc.reason}: {api_message(exc)}")
        if exc.status in (401, 403):
            say("the chain needs the Role in k8s/base/rbac.yaml (kubectl apply -k k8s/overlays/<name>) "
                "bound to the identity it runs as")
        return 2


def api_message(exc) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", exc.body)
    except (TypeError, ValueError):
        return str(exc.body)


def run(cluster: Cluster, steps: list[Step], args: argparse.Namespace) -> int:
    source = f"--overlay {args.overlay}" if args.overlay else f"--rendered {args.rendered}"
    current = None
    try:
        for step in steps:
            current = step
            if step.skip_reason:
                say(f"{step.title}: skipped, {step.skip_reason}")
                continue
            started = time.monotonic()
            cluster.start(step, force=args.force)
            outcome = cluster.follow(step)
            minutes = (time.monotonic() - started) / 60
            if not outcome.ok:
                name = step.job["metadata"]["name"]
                lines = [f"{step.title} FAILED after {minutes:.1f} min: Job {name} is Failed "
                         f"({outcome.reason}: {outcome.message})"]
                if outcome.exit_code is not None:
                    meaning = EXIT_MEANING.get(outcome.exit_code, "see the log above")
                    lines.append(f"exit code {outcome.exit_code}: {meaning}")
                lines.append(f"logs: kubectl -n {cluster.namespace} logs job/{name} --all-containers")
                lines.append(f"after fixing it, resume with: python scripts/chain.py {source} "
                             f"--run-id {args.run_id} --from {step.phase}"
                             + (f" --rounds {args.rounds}" if args.rounds > 1 else ""))
                say("\n  ".join(lines))
                return 1
            say(f"{step.title}: Job complete in {minutes:.1f} min")
    except KeyboardInterrupt:
        if current is not None:
            say(f"interrupted; Job {current.job['metadata']['name']} keeps running in the cluster. "
                "Run the same command again to reattach.")
        return 130
    say(f"run {args.run_id}: every selected phase is done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
