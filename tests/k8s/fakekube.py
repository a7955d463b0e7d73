"""A small Kubernetes API server in this process, over HTTP, for testing scripts/chain.py.

The suite runs without a kube-apiserver (none is packaged on PyPI, npm or Debian, and
envtest needs its own binaries), so this is a fake, and says where it differs:

- It speaks the real REST paths, JSON shapes, status codes and `Status` errors for the
  calls the chain script makes (Jobs: create/get/patch/delete; Pods: list; pods/log:
  get, with `follow=true` streamed as the container writes), and the real `kubernetes`
  client talks to it through a kubeconfig, with a bearer token.
- It authorizes every request against a Role's rules (the Role from the rendered
  overlay), answering 403 like RBAC does, and records every request.
- It validates created Jobs against the Kubernetes OpenAPI schema (kubernetes-validate).
- A small Job controller plays the parts of the scheduler, kubelet and Job controller:
  it honours `suspend`, runs one pod at a time, applies the Job's own
  `podFailurePolicy` rules (FailJob / Ignore / Count on exit codes and pod conditions)
  and `backoffLimit`, and sets the Complete/Failed conditions the way Kubernetes 1.31+
  names them. What a pod "does" is given by the test: scripted log lines and exit
  codes, or a real process (the phase's command run locally).

Indexed Jobs run one pod per index at once (parallelism = completions), with the
completion index in the pod's annotation/label and JOB_COMPLETION_INDEX; the Job completes
when every index has succeeded; failures of any index share backoffLimit.

Not modelled: watches, resourceVersion conflicts, activeDeadlineSeconds, TTL cleanup,
backoffLimitPerIndex, parallelism below completions, scheduling and node resources,
admission (Pod Security).
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlparse

import yaml

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass
class PodRun:
    """What one pod of a Job does. `process`, when given, runs the main container instead
    of `lines`/`exit_code`: it gets a `log(line)` function and returns the exit code."""

    lines: list[str] = field(default_factory=list)
    exit_code: int = 0
    init_lines: list[str] = field(default_factory=lambda: ["config ok"])
    init_exit_code: int = 0
    disrupted: bool = False  # preempted: DisruptionTarget condition, killed with SIGTERM (143)
    waiting: tuple[str, str] | None = None  # (reason, message) the main container waits in, for `waiting_s`
    waiting_s: float = 0.0
    line_delay_s: float = 0.01
    process: Callable[[Callable[[str], None]], int] | None = None
    init_process: Callable[[Callable[[str], None]], int] | None = None  # runs the init container instead


# (job, attempt starting at 0) -> what its pod does; an Indexed Job's copy carries "_index".
Runtime = Callable[[dict, int], PodRun]
INDEX_KEY = "batch.kubernetes.io/job-completion-index"


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _selector_matches(selector: str | None, labels: dict) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def _merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


class FakeKube:
    def __init__(self, runtime: Runtime, *, role_rules: list[dict] | None, namespace: str,
                 token: str = "chain-token", validate_version: str | None = "1.30.0"):
        self.runtime = runtime
        self.role_rules = role_rules  # None: allow everything
        self.namespace = namespace
        self.token = token
        self.validate_version = validate_version
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.requests: list[tuple[str, str, str, str]] = []  # (verb, apiGroup, resource, name)
        self.denied: list[tuple[str, str, str, str]] = []
        self.lock = threading.RLock()
        self._clock = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        self._names = itertools.count()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> "FakeKube":
        fake = self

        class Handler(_Handler):
            kube = fake

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._spawn(self.server.serve_forever)
        self._spawn(self._controller)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path) -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "pipeline-chain", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "pipeline-chain",
                                                      "namespace": self.namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def now(self) -> str:
        # A clock that ticks a second per event: timestamps are second-precision as in
        # Kubernetes, yet distinct and ordered, as retries seconds apart would be.
        with self.lock:
            self._clock += dt.timedelta(seconds=1)
            return self._clock.strftime("%Y-%m-%dT%H:%M:%SZ")

    # ---------------------------------------------------------------------------------------
    # Test helpers

    def stage(self, job: dict) -> None:
        """Put a Job in the store as `kubectl apply -k` would have (no RBAC check)."""
        with self.lock:
            self._create_job(copy.deepcopy(job))

    def verbs_used(self) -> set[tuple[str, str, str]]:
        return {(verb, group, resource) for verb, group, resource, _ in self.requests}

    # ---------------------------------------------------------------------------------------
    # Authorization: the Role's rules, as RBAC evaluates them.

    def allowed(self, verb: str, group: str, resource: str, namespace: str) -> bool:
        if self.role_rules is None:
            return True
        if namespace != self.namespace:
            return False
        for rule in self.role_rules:
            if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) and \
                    (resource in rule.get("resources", []) or "*" in rule.get("resources", [])) and \
                    (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
                return True
        return False

    # ---------------------------------------------------------------------------------------
    # Jobs and pods (called with the lock held)

    def _create_job(self, job: dict) -> dict:
        meta = job.setdefault("metadata", {})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=self.now(), resourceVersion=str(next(self._names)),
                    namespace=self.namespace)
        meta.setdefault("labels", {})
        job["spec"].setdefault("backoffLimit", 6)
        job["spec"].setdefault("suspend", False)
        job["status"] = {}
        job["_pods"] = []  # names, in creation order (not serialized)
        job["_failed"] = 0
        job["_active"] = {}  # completion index -> pod name
        job["_succeeded"] = set()
        self._update_suspended(job)
        self.jobs[meta["name"]] = job
        return job

    def _update_suspended(self, job: dict) -> None:
        conditions = [c for c in job["status"].get("conditions", []) if c["type"] != "Suspended"]
        if job["spec"].get("suspend"):
            conditions.append({"type": "Suspended", "status": "True", "reason": "JobSuspended",
                               "message": "Job suspended", "lastTransitionTime": self.now()})
        elif job["status"].get("startTime") is None:
            job["status"]["startTime"] = self.now()
        job["status"]["conditions"] = conditions

    def _finished(self, job: dict) -> bool:
        return any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                   for c in job["status"].get("conditions", []))

    def _finish(self, job: dict, kind: str, reason: str, message: str) -> None:
        now = self.now()
        target = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
        job["status"].setdefault("conditions", []).extend([
            {"type": target, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now},
            {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now},
        ])
        job["status"]["active"] = 0
        if kind == "Complete":
            job["status"]["completionTime"] = now

    @staticmethod
    def _indexes(job: dict) -> range:
        indexed = job["spec"].get("completionMode") == "Indexed"
        return range(job["spec"].get("completions", 1) if indexed else 1)

    def _controller(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                for job in list(self.jobs.values()):
                    if job["spec"].get("suspend") or self._finished(job):
                        continue
                    for index in self._indexes(job):
                        if index not in job["_active"] and index not in job["_succeeded"]:
                            self._new_pod(job, index)
            time.sleep(0.01)

    def _new_pod(self, job: dict, index: int) -> None:
        indexed = job["spec"].get("completionMode") == "Indexed"
        name = f"{job['metadata']['name']}-{f'{index}-' if indexed else ''}{next(self._names):05d}"
        template = job["spec"]["template"]
        labels = {**template.get("metadata", {}).get("labels", {}), JOB_NAME_LABEL: job["metadata"]["name"],
                  "job-name": job["metadata"]["name"], "batch.kubernetes.io/controller-uid": job["metadata"]["uid"]}
        spec = copy.deepcopy(template["spec"])
        annotations = {}
        if indexed:
            labels[INDEX_KEY] = annotations[INDEX_KEY] = str(index)
            for c in spec.get("initContainers", []) + spec["containers"]:
                c.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "uid": str(uuid.uuid4()), "labels": labels,
                         "annotations": annotations, "creationTimestamp": self.now(),
                         "resourceVersion": str(next(self._names))},
            "spec": spec,
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "initContainerStatuses": [self._waiting(c["name"], "PodInitializing") for c in spec.get("initContainers", [])],
                "containerStatuses": [self._waiting(c["name"], "PodInitializing") for c in spec["containers"]],
            },
        }
        self.pods[name] = pod
        job["_pods"].append(name)
        job["_active"][index] = name
        job["status"]["active"] = len(job["_active"])
        attempt = sum(1 for p in job["_pods"] if self.pods.get(p, {}).get("metadata", {}).get("annotations", {})
                      .get(INDEX_KEY, "0") == str(index)) - 1 if indexed else len(job["_pods"]) - 1
        run = self.runtime({**copy.deepcopy(job), "_index": index}, attempt)
        self._spawn(self._run_pod, job["metadata"]["name"], name, run)

    @staticmethod
    def _waiting(name: str, reason: str, message: str = "") -> dict:
        return {"name": name, "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                "state": {"waiting": {"reason": reason, "message": message}}}

    def _set_state(self, pod: dict, container: str, state: dict, init: bool = False) -> None:
        key = "initContainerStatuses" if init else "containerStatuses"
        for status in pod["status"][key]:
            if status["name"] == container:
                status["state"] = state

    def _log(self, pod_name: str, container: str, line: str) -> None:
        with self.lock:
            self.logs.setdefault((pod_name, container), []).append(line)

    def _run_pod(self, job_name: str, pod_name: str, run: PodRun) -> None:
        with self.lock:
            pod = self.pods[pod_name]
            init = [c["name"] for c in pod["spec"].get("initContainers", [])]
            main = pod["spec"]["containers"][0]["name"]
        for name in init:
            with self.lock:
                self._set_state(pod, name, {"running": {"startedAt": self.now()}}, init=True)
            if run.init_process is not None:
                init_code = run.init_process(lambda line, name=name: self._log(pod_name, name, line))
            else:
                for line in run.init_lines:
                    self._log(pod_name, name, line)
                init_code = run.init_exit_code
            with self.lock:
                self._set_state(pod, name, {"terminated": {"exitCode": init_code, "startedAt": self.now(),
                                                           "finishedAt": self.now(),
                                                           "reason": "Completed" if init_code == 0 else "Error"}},
                                init=True)
            if init_code != 0:
                return self._pod_ended(job_name, pod_name, "Failed", {(name, init_code)}, disrupted=False)
        with self.lock:
            pod["status"]["phase"] = "Pending"
            if run.waiting:
                self._set_state(pod, main, {"waiting": {"reason": run.waiting[0], "message": run.waiting[1]}})
        if run.waiting:
            time.sleep(run.waiting_s)
        with self.lock:
            pod["status"]["phase"] = "Running"
            self._set_state(pod, main, {"running": {"startedAt": self.now()}})
        if run.process is not None:
            code = run.process(lambda line: self._log(pod_name, main, line))
        else:
            for line in run.lines:
                if self._stop.is_set() or pod_name not in self.pods:
                    return
                self._log(pod_name, main, line)
                time.sleep(run.line_delay_s)
            code = 143 if run.disrupted else run.exit_code
        with self.lock:
            if run.disrupted:
                pod["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True",
                                                    "reason": "PreemptionByScheduler",
                                                    "message": "Kube-scheduler: preempting to accommodate a higher priority pod",
                                                    "lastTransitionTime": self.now()})
            self._set_state(pod, main, {"terminated": {"exitCode": code, "startedAt": self.now(), "finishedAt": self.now(),
                                                       "reason": "Completed" if code == 0 else "Error"}})
        self._pod_ended(job_name, pod_name, "Succeeded" if code == 0 else "Failed", {(main, code)},
                        disrupted=run.disrupted)

    def _pod_ended(self, job_name: str, pod_name: str, phase: str, exits: set, *, disrupted: bool) -> None:
        with self.lock:
            pod = self.pods.get(pod_name)
            job = self.jobs.get(job_name)
            if pod is None or job is None:
                return
            pod["status"]["phase"] = phase
            index = int(pod["metadata"]["annotations"].get(INDEX_KEY, 0))
            job["_active"].pop(index, None)
            job["status"]["active"] = len(job["_active"])
            if self._finished(job):
                return
            if phase == "Succeeded":
                job["_succeeded"].add(index)
                job["status"]["succeeded"] = len(job["_succeeded"])
                if len(job["_succeeded"]) == len(self._indexes(job)):
                    self._finish(job, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                return
            action, message = self._match_policy(job, pod, exits)
            if action == "FailJob":
                job["status"]["failed"] = job["status"].get("failed", 0) + 1
                self._finish(job, "Failed", "PodFailurePolicy", message)
            elif action == "Ignore":
                pass  # a new pod, not counted against backoffLimit
            else:
                job["_failed"] += 1
                job["status"]["failed"] = job["_failed"]
                if job["_failed"] > job["spec"]["backoffLimit"]:
                    self._finish(job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")

    def _match_policy(self, job: dict, pod: dict, exits: set) -> tuple[str, str]:
        """The first matching podFailurePolicy rule, as the Job controller evaluates it."""
        rules = (job["spec"].get("podFailurePolicy") or {}).get("rules", [])
        for index, rule in enumerate(rules):
            on_exit = rule.get("onExitCodes")
            if on_exit:
                for container, code in sorted(exits):
                    if code == 0 or (on_exit.get("containerName") not in (None, container)):
                        continue
                    hit = code in on_exit["values"]
                    if hit == (on_exit["operator"] == "In"):
                        return rule["action"], (f"Container {container} for pod {self.namespace}/{pod['metadata']['name']} "
                                                f"failed with exit code {code} matching {rule['action']} rule at index {index}")
            for wanted in rule.get("onPodConditions", []):
                for cond in pod["status"]["conditions"]:
                    if cond["type"] == wanted["type"] and cond["status"] == wanted.get("status", "True"):
                        return rule["action"], (f"Pod {self.namespace}/{pod['metadata']['name']} has condition "
                                                f"{cond['type']} matching {rule['action']} rule at index {index}")
        return "Count", ""

    # ---------------------------------------------------------------------------------------
    # Serialization

    def public(self, obj: dict, kind: str) -> dict:
        out = {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}
        out["apiVersion"], out["kind"] = ("batch/v1", "Job") if kind == "jobs" else ("v1", "Pod")
        return out


_PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[a-z.]+)/v1)/namespaces/(?P<ns>[^/]+)/(?P<resource>jobs|pods)"
                   r"(?:/(?P<name>[^/]+)(?:/(?P<sub>log))?)?$")


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.0"  # a streamed log ends when the connection closes, as a follow does

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str):
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        match = _PATH.match(url.path)
        if not match:
            return self._send(404, _status(404, "NotFound", f"the server could not find the requested resource ({url.path})"))
        group = match["group"] or ""
        resource = match["resource"] + ("/log" if match["sub"] else "")
        name, ns = match["name"], match["ns"]
        verb = {"GET": "get" if name else ("watch" if query.get("watch") == "true" else "list"),
                "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[method]
        if self.headers.get("Authorization") != f"Bearer {self.kube.token}":
            return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
        kube = self.kube
        if not kube.allowed(verb, group, resource, ns):
            kube.denied.append((verb, group, resource, name or ""))
            return self._send(403, _status(403, "Forbidden",
                                           f'{resource} "{name or ""}" is forbidden: User "system:serviceaccount:'
                                           f'{kube.namespace}:pipeline-chain" cannot {verb} resource "{resource}" '
                                           f'in API group "{group}" in the namespace "{ns}"'))
        body = None
        if method in ("POST", "PATCH", "PUT"):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
        created = body.get("metadata", {}).get("name", "") if verb == "create" and isinstance(body, dict) else ""
        kube.requests.append((verb, group, resource, name or created))
        if resource == "pods/log":
            return self._log(name, query)
        handler = getattr(self, f"_{match['resource']}_{verb}", None)
        if handler is None:
            return self._send(405, _status(405, "MethodNotAllowed", f"{verb} on {resource} is not supported here"))
        return handler(name, query, body)

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PATCH(self):
        self._route("PATCH")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PUT(self):
        self._route("PUT")

    # -- jobs

    def _jobs_create(self, name, query, body):
        kube = self.kube
        if kube.validate_version:
            import kubernetes_validate

            try:
                kubernetes_validate.validate(body, kube.validate_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                return self._send(422, _status(422, "Invalid", f"Job is invalid: {exc.message}"))
        with kube.lock:
            job_name = body["metadata"]["name"]
            if job_name in kube.jobs:
                return self._send(409, _status(409, "AlreadyExists", f'jobs.batch "{job_name}" already exists'))
            job = kube._create_job(body)
            return self._send(201, kube.public(job, "jobs"))

    def _jobs_get(self, name, query, body):
        with self.kube.lock:
            job = self.kube.jobs.get(name)
            if job is None:
                return self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
            return self._send(200, self.kube.public(job, "jobs"))

    def _jobs_list(self, name, query, body):
        with self.kube.lock:
            items = [self.kube.public(j, "jobs") for j in self.kube.jobs.values()
                     if _selector_matches(query.get("labelSelector"), j["metadata"].get("labels", {}))]
        return self._send(200, {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items})

    def _jobs_patch(self, name, query, body):
        content_type = self.headers.get("Content-Type", "")
        if "json-patch" in content_type and not isinstance(body, list) or \
                "json-patch" not in content_type and not isinstance(body, dict):
            return self._send(400, _status(400, "BadRequest", f"patch body does not match {content_type}"))
        if isinstance(body, list):
            return self._send(415, _status(415, "UnsupportedMediaType", "JSON patch is not supported by this fake"))
        with self.kube.lock:
            job = self.kube.jobs.get(name)
            if job is None:
                return self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
            if set(body) - {"metadata", "spec"} or set(body.get("spec", {})) - {"suspend", "parallelism",
                                                                                "activeDeadlineSeconds"}:
                # The API server rejects changes to a Job's template and most of its spec.
                return self._send(422, _status(422, "Invalid", "field is immutable"))
            merged = _merge_patch({"metadata": job["metadata"], "spec": job["spec"]}, body)
            job["metadata"], job["spec"] = merged["metadata"], merged["spec"]
            self.kube._update_suspended(job)
            return self._send(200, self.kube.public(job, "jobs"))

    def _jobs_delete(self, name, query, body):
        with self.kube.lock:
            job = self.kube.jobs.pop(name, None)
            if job is None:
                return self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
            for pod in job["_pods"]:  # background propagation, done at once
                self.kube.pods.pop(pod, None)
            return self._send(200, _status(200, "", "") | {"status": "Success"})

    # -- pods

    def _pods_list(self, name, query, body):
        with self.kube.lock:
            items = [self.kube.public(p, "pods") for p in self.kube.pods.values()
                     if _selector_matches(query.get("labelSelector"), p["metadata"]["labels"])]
        return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})

    def _log(self, name, query):
        kube = self.kube
        container = query.get("container")
        with kube.lock:
            pod = kube.pods.get(name)
            if pod is None:
                return self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
            statuses = pod["status"]["containerStatuses"] + pod["status"]["initContainerStatuses"]
            status = next((s for s in statuses if s["name"] == container), None)
            if status is None:
                return self._send(400, _status(400, "BadRequest", f"container {container} is not valid for pod {name}"))
            if "waiting" in status["state"]:
                reason = status["state"]["waiting"]["reason"]
                return self._send(400, _status(400, "BadRequest",
                                               f'container "{container}" in pod "{name}" is waiting to start: {reason}'))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        sent = 0
        while True:
            with kube.lock:
                lines = list(kube.logs.get((name, container), []))
                pod = kube.pods.get(name)
                ended = pod is None or "terminated" in next(
                    s for s in pod["status"]["containerStatuses"] + pod["status"]["initContainerStatuses"]
                    if s["name"] == container)["state"]
            for line in lines[sent:]:
                self.wfile.write(line.encode() + b"\n")
            self.wfile.flush()
            sent = len(lines)
            if ended or query.get("follow") != "true" or kube._stop.is_set():
                # One more read after the end: lines logged just before termination.
                with kube.lock:
                    rest = list(kube.logs.get((name, container), []))[sent:]
                for line in rest:
                    self.wfile.write(line.encode() + b"\n")
                return
            time.sleep(0.01)
