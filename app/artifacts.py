"""Where each phase's artifacts live, and the manifest that makes them count.

Layout, the same on a local disk and in S3 (docs/STORAGE.md has the details):

    <store>/runs/<run-id>/<phase>/manifest.json               written last; the only thing readers trust
    <store>/runs/<run-id>/<phase>/<attempt-id>/<files...>     listed in the manifest with size and SHA-256

A phase works in a private local directory, then `publish` uploads every file and
writes `manifest.json` last, with a conditional write, so a crash mid-upload leaves
no manifest and the artifact does not exist as far as any reader is concerned.
Each publish uploads into its own attempt directory, so a second writer of the same
phase (a duplicate pod, a retry racing a slow original) can never overwrite files that
the winning manifest describes: the loser's conditional manifest write fails and it
deletes its own files. `fetch` reads the manifest, downloads exactly the files it
names and checks each checksum. Nothing ever lists a prefix to guess what exists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Iterator, Protocol

from app.errors import ConfigError, InputError, PipelineError, StorageError
from app.log import redact_values, warn

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2  # 2: files live under the manifest's "data_dir" (1: next to the manifest)
ATTEMPT_PREFIX = "attempt-"


# ---------------------------------------------------------------------------------------------
# Backends: byte storage under a root. Local directories here; S3 in app/s3store.py.


class Backend(Protocol):
    def check(self) -> None:
        """Fail fast (StorageError/ConfigError) if the store cannot be used at all."""

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write; with `if_absent`, return False instead of overwriting an existing object."""

    def upload(self, local_path: Path, key: str) -> None: ...

    def download(self, key: str, local_path: Path) -> None: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """A path readers can use in place (local backend), or None (remote backend)."""


class LocalBackend:
    """Keys are paths relative to `root`; writes go through a temporary file and a rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create store directory {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"store directory {self.root} is not writable")

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # unique: two pods may both be pid 1
        tmp.write_bytes(data)
        if if_absent:
            try:
                os.link(tmp, path)  # atomic create-if-absent on POSIX
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True
        os.replace(tmp, path)
        return True

    def upload(self, local_path: Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if Path(local_path).resolve() == path.resolve():
            return
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # unique: two pods may both be pid 1
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def download(self, key: str, local_path: Path) -> None:
        source = self._path(key)
        if not source.exists():
            raise InputError(f"{source}: listed in the manifest but missing")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local_path)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove directories this left empty, but only inside an attempt directory: the phase
        # directory above it may be about to receive another writer's files.
        parent = path.parent
        while parent != self.root and any(part.startswith(ATTEMPT_PREFIX)
                                          for part in parent.relative_to(self.root).parts):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def open_store(uri: str) -> tuple[Backend, str]:
    """(backend, key prefix) for an artifact URI: a local path or s3://bucket/prefix."""
    if is_s3(uri):
        from app.s3store import open_s3

        return open_s3(uri)
    return LocalBackend(uri), ""


def join(*parts: str) -> str:
    head, *rest = [str(p) for p in parts]
    for part in rest:
        head = head.rstrip("/") + "/" + part.strip("/")
    return head


def run_uri(store: str, run_id: str) -> str:
    """Where one run's artifacts live: a directory per phase (app.phases.PHASES, and `base`
    for a base model built locally), plus the pipeline's `report.md`."""
    return join(store, "runs", run_id)


def phase_uri(store: str, run_id: str, phase: str, round: int = 1) -> str:
    """The one place that says where a phase's artifacts live. Round r >= 2 of preference training
    (rollouts, preferences, dpo again, from the latest policy) lives under `round-<r>/`."""
    if round <= 1:
        return join(run_uri(store, run_id), phase)
    return join(run_uri(store, run_id), f"round-{round}", phase)


def check_store(store: str) -> None:
    """Reach the store before any model loads: missing bucket, bad credentials, no endpoint."""
    backend, _ = open_store(store)
    backend.check()


# ---------------------------------------------------------------------------------------------
# Manifests


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    from app import __version__

    sha = os.environ.get("APP_GIT_SHA")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def read_manifest(uri: str) -> dict | None:
    """The manifest of a published artifact, or None when it is not (yet) published."""
    backend, prefix = open_store(uri)
    raw = backend.read_bytes(join(prefix, MANIFEST) if prefix else MANIFEST)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{join(uri, MANIFEST)}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise InputError(f"{join(uri, MANIFEST)}: not a manifest (no 'files')")
    return manifest


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def lineage_entry(uri: str, manifest: dict) -> dict:
    """How a manifest names one of its inputs: where it is and exactly which version."""
    return {"uri": uri, "phase": manifest.get("phase"), "manifest_sha256": manifest_digest(manifest),
            "created_at": manifest.get("created_at")}


def is_current(uri: str, identity: dict) -> bool:
    """True when the artifact is published with the same config from the same inputs (rerun = no-op).

    An input that was republished since (a `--force` rerun of SFT, say) makes every
    artifact built from the old one stale, so a resumed pipeline redoes them.
    """
    manifest = read_manifest(uri)
    if manifest is None or manifest.get("config_hash") != config_hash(identity):
        return False
    for entry in manifest.get("inputs", {}).values():
        if isinstance(entry, dict) and entry.get("uri") and entry.get("manifest_sha256"):
            current = read_manifest(entry["uri"])
            if current is None or manifest_digest(current) != entry["manifest_sha256"]:
                return False
    return True


def refuse_other_config(uri: str, identity: dict) -> None:
    """Raise ConfigError when `uri` is published with another config: `publish` would refuse to
    replace it, so a phase checks this before it loads a model or any data (--force skips it)."""
    backend, prefix = open_store(uri)
    raw = backend.read_bytes(_keyer(prefix)(MANIFEST))
    if raw is None:
        return
    try:
        previous = json.loads(raw)
    except json.JSONDecodeError:
        previous = None  # a damaged manifest counts as published, as in `publish`
    if not (isinstance(previous, dict) and previous.get("config_hash") == config_hash(identity)):
        raise ConfigError(_other_config(uri))


def _other_config(uri: str) -> str:
    return (f"{uri} is already published with a different config; "
            "rerun with --force to replace it, or use another --run-id")


def publish(local_dir: Path, uri: str, *, phase: str, config: dict, identity: dict | None = None,
            inputs: dict | None = None, metrics: dict | None = None, timings: dict | None = None,
            overwrite: bool = False) -> dict:
    """Upload every file under `local_dir` into a fresh attempt directory, then write the manifest last.

    With `overwrite` (a `--force` rerun) an existing manifest is removed first, so the
    old artifact stops counting before anything else happens; its files are deleted
    once the new manifest is in place. The same happens without it when the existing
    artifact is stale (same config, but built from input versions other than `inputs`).
    Otherwise a writer that finds a manifest already there loses: it raises instead of
    publishing. Whatever fails, no manifest is left behind, and the files this attempt
    uploaded are removed (best effort).
    """
    started = time.monotonic()
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"publish: {local_dir} is not a directory")
    backend, prefix = open_store(uri)
    key = _keyer(prefix)
    this_hash = config_hash(identity if identity is not None else config)

    previous = None
    raw = backend.read_bytes(key(MANIFEST))
    if raw is not None:
        try:
            previous = json.loads(raw)
        except json.JSONDecodeError:
            previous = None  # a damaged manifest counts as published; --force may replace it
        same_config = isinstance(previous, dict) and previous.get("config_hash") == this_hash
        # Built with this config from inputs that have been republished since: stale, and
        # `is_current` says so, so the rerun that redid it replaces it without --force.
        stale = same_config and _input_versions(previous.get("inputs")) != _input_versions(inputs)
        if not (overwrite or stale):
            if same_config:
                raise StorageError(f"{uri}: another writer published this artifact (same config) first")
            raise ConfigError(_other_config(uri))
        backend.delete(key(MANIFEST))

    attempt = f"{ATTEMPT_PREFIX}{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
    files: dict[str, dict] = {}
    uploaded: list[str] = []
    try:
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            name = path.relative_to(local_dir).as_posix()
            if name == MANIFEST:
                continue
            files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            uploaded.append(key(join(attempt, name)))
            backend.upload(path, uploaded[-1])

        manifest = {
            "schema": SCHEMA_VERSION,
            "phase": phase,
            "uri": uri,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(),
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
            "config": redact_values(config),
            "config_hash": this_hash,
            "inputs": redact_values(inputs or {}),
            "metrics": metrics or {},
            "timings": {**(timings or {}), "publish_s": round(time.monotonic() - started, 3)},
            "data_dir": attempt,
            "total_bytes": sum(meta["size"] for meta in files.values()),
            "files": files,
        }
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        if not backend.write_bytes(key(MANIFEST), data, if_absent=True):
            raise StorageError(f"{uri}: another writer published this artifact first; not overwriting it")
    except BaseException:
        _discard(backend, uploaded)  # no manifest of ours names them
        raise

    # Servers without conditional writes: a concurrent writer may have replaced our manifest.
    try:
        current = backend.read_bytes(key(MANIFEST))
    except PipelineError:
        current = data  # cannot tell; ours was written and nothing says otherwise
    if current != data:
        _discard(backend, uploaded)
        raise StorageError(f"{uri}: another writer published this artifact at the same time; not using ours")

    if isinstance(previous, dict) and isinstance(previous.get("files"), dict):
        old_dir = previous.get("data_dir", "")
        if old_dir != attempt:
            _discard(backend, [key(join(old_dir, name) if old_dir else name) for name in previous["files"]])
    return manifest


def _input_versions(inputs: dict | None) -> dict:
    """{input name: manifest digest} of the artifact inputs in a lineage (other inputs ignored)."""
    return {name: entry.get("manifest_sha256") for name, entry in (inputs or {}).items()
            if isinstance(entry, dict) and entry.get("uri")}


def _discard(backend: Backend, keys: list[str]) -> None:
    """Best-effort removal of objects no manifest names; stops at the first failure (the store is down)."""
    for name in keys:
        try:
            backend.delete(name)
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the error being raised
            warn(f"warning: could not delete {name} ({exc}); it is unreferenced and safe to remove")
            return


def _keyer(prefix: str):
    return (lambda name: join(prefix, name)) if prefix else (lambda name: name)


def _safe_name(name: str, label: str) -> str:
    """Names from a manifest must stay inside the artifact: a tampered one must not write elsewhere."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or path.as_posix() != name:
        raise InputError(f"{label}: unsafe file name {name!r} in the manifest")
    return name


def cache_base(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PIPELINE_CACHE") or Path(tempfile.gettempdir()) / "pipeline-cache")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (torchrun ranks fetching the same artifact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch(uri: str, cache_dir: str | os.PathLike | None = None, private: bool = False) -> tuple[Path, dict]:
    """(local directory with the artifact's files, manifest), every file checked against the manifest.

    Local stores are read in place; S3 artifacts are downloaded once per manifest version
    into `cache_dir` (default $PIPELINE_CACHE, else <tmp>/pipeline-cache) and reused.
    `private`: copy from a local store into the cache too, so the directory stays valid when
    the artifact is deleted later (a checkpoint that training goes on to rotate away).
    """
    manifest = read_manifest(uri)
    if manifest is None:
        raise InputError(f"{uri} is not published (no {MANIFEST}); run its phase first")
    for _ in range(3):
        try:
            return _fetch_once(uri, manifest, cache_dir, private), manifest
        except InputError:
            latest = read_manifest(uri)
            if latest is None:
                raise StorageError(f"{uri} was unpublished while being read (a --force rerun?); retry later") from None
            if manifest_digest(latest) == manifest_digest(manifest):
                raise
            manifest = latest  # republished while we read it: start over with the new version
    raise StorageError(f"{uri} kept changing while being read; retry later")


def _fetch_once(uri: str, manifest: dict, cache_dir, private: bool = False) -> Path:
    backend, prefix = open_store(uri)
    key = _keyer(prefix)
    data_dir = manifest.get("data_dir", "")
    if data_dir:
        _safe_name(data_dir, uri)
    entries = [(_safe_name(name, uri), meta) for name, meta in manifest["files"].items()]

    in_place = None if private else backend.local_path(key(MANIFEST))
    if in_place is not None:
        root = in_place.parent / data_dir if data_dir else in_place.parent
        for name, meta in entries:
            _verify(root / name, meta, f"{uri}/{name}")
        return root

    digest = manifest_digest(manifest)
    base = cache_base(cache_dir) / "artifacts"
    root = base / digest[:16]
    marker = base / f"{digest[:16]}.verified.json"
    with _locked(base / f"{digest[:16]}.lock"):
        if _marker_matches(marker, root, digest, entries):
            return root
        for name, meta in entries:
            target = root / name
            if target.exists() and target.stat().st_size == meta["size"] and sha256_file(target) == meta["sha256"]:
                continue
            backend.download(key(join(data_dir, name) if data_dir else name), target)
            try:
                _verify(target, meta, f"{uri}/{name}")
            except InputError:
                target.unlink(missing_ok=True)  # never leave bad bytes where the next fetch would look
                raise
        stats = {name: [(root / name).stat().st_size, (root / name).stat().st_mtime_ns] for name, _ in entries}
        marker.write_text(json.dumps({"manifest_sha256": digest, "files": stats}))
    return root


def _marker_matches(marker: Path, root: Path, digest: str, entries: list) -> bool:
    """True when every file was verified before and has not been touched since (no re-hashing GBs)."""
    try:
        recorded = json.loads(marker.read_text())
        if recorded.get("manifest_sha256") != digest:
            return False
        for name, meta in entries:
            stat = (root / name).stat()
            if [stat.st_size, stat.st_mtime_ns] != recorded["files"][name] or stat.st_size != meta["size"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _verify(path: Path, meta: dict, label: str) -> None:
    if not path.exists():
        raise InputError(f"{label}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != meta["size"]:
        raise InputError(f"{label}: size {size} does not match the manifest's {meta['size']} (truncated or replaced)")
    if sha256_file(path) != meta["sha256"]:
        raise InputError(f"{label}: SHA-256 does not match the manifest (corrupted or tampered)")


def local_copy(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for one plain file given as a local path or an s3:// object.

    For data files that are not artifacts, e.g. `--train-data s3://bucket/gsm8k/train.jsonl`:
    the object is downloaded once into the cache and again only when its size or ETag
    changes. Directories in S3 are not supported (that would need listing): publish them
    as an artifact instead.
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists() or path.is_dir():  # a named pipe is a file here too
            raise InputError(f"{uri}: no such file")
        return path
    backend, key = open_store(uri)
    if not key:
        raise ConfigError(f"{uri}: name an object (s3://bucket/path/file), not a bucket")
    head = backend.size(key)  # type: ignore[attr-defined]
    if head is None:
        raise InputError(f"{uri}: no such object")
    size, etag = head
    slot = cache_base(cache_dir) / "objects" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = slot / PurePosixPath(key).name
    stamp = slot.parent / f"{slot.name}.json"
    with _locked(slot.parent / f"{slot.name}.lock"):
        try:
            if json.loads(stamp.read_text()) == {"etag": etag, "size": size} and target.stat().st_size == size:
                return target
        except (OSError, ValueError):
            pass
        backend.download(key, target)
        if target.stat().st_size != size:
            raise StorageError(f"{uri}: downloaded {target.stat().st_size} bytes, expected {size}; retry")
        stamp.write_text(json.dumps({"etag": etag, "size": size}))
    return target


def trace(uri: str) -> list[dict]:
    """The lineage of a published artifact, depth-first from `uri` itself (depth 0);
    `python -m app lineage` prints it.

    Each artifact input is checked against the manifest version its consumer recorded:
    status "ok" (still that version), "replaced" (republished since, e.g. by --force) or
    "missing". Inputs that are not artifacts (a dataset name, say) are listed with their value.
    """
    rows: list[dict] = []

    def walk(target: str, expected: str | None, depth: int, via: str | None) -> None:
        manifest = read_manifest(target)
        if manifest is None:
            status = "missing"
        elif expected is None or manifest_digest(manifest) == expected:
            status = "ok"
        else:
            status = "replaced"
        manifest = manifest or {}
        rows.append({"depth": depth, "input": via, "uri": target, "status": status, "phase": manifest.get("phase"),
                     "created_at": manifest.get("created_at"), "config_hash": manifest.get("config_hash"),
                     "code_version": manifest.get("code_version")})
        if status != "ok" or depth > 32:
            return
        for name, entry in sorted(manifest.get("inputs", {}).items()):
            if isinstance(entry, dict) and "uri" in entry:
                walk(entry["uri"], entry.get("manifest_sha256"), depth + 1, name)
            else:
                rows.append({"depth": depth + 1, "input": name, "value": entry})

    walk(uri, None, 0, None)
    return rows


@contextlib.contextmanager
def workdir(phase: str) -> Iterator[Path]:
    """A private local directory for a phase's outputs before they are published."""
    root = Path(os.environ.get("PIPELINE_WORKDIR", tempfile.gettempdir()))
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{phase}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def trainer_dir(phase: str, run_id: str) -> Path:
    """The HF Trainer's local output directory for a training phase, emptied by local rank 0.

    Scratch only: what counts is uploaded from here (checkpoints, the artifact). A stale
    `checkpoint-N/` of an earlier run must not be uploaded, hence the fresh start. It holds the
    Trainer's newest checkpoint only (save_total_limit=1); `checkpoints.clear_checkpoints`
    removes it once the phase is published, and the next attempt of a failed run empties it.
    """
    root = Path(os.environ.get("PIPELINE_WORKDIR", tempfile.gettempdir())) / f"{phase}-trainer-{run_id}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return root
