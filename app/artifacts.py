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
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Iterator, Protocol

from app.errors import InputError, StorageError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2  # 2: files live under the manifest's "data_dir" (1: next to the manifest)
ATTEMPT_PREFIX = "attempt-"
PHASES = ("base", "sft", "rollouts", "preferences", "dpo", "eval")


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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, path)

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


def phase_uri(store: str, run_id: str, phase: str) -> str:
    """The one place that says where a phase's artifacts live."""
    return join(store, "runs", run_id, phase)


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
    """True when the artifact is published with the same config (rerun = no-op)."""
    manifest = read_manifest(uri)
    return manifest is not None and manifest.get("config_hash") == config_hash(identity)


def publish(local_dir: Path, uri: str, *, phase: str, config: dict, identity: dict | None = None,
            inputs: dict | None = None, metrics: dict | None = None, timings: dict | None = None,
            overwrite: bool = False) -> dict:
    """Upload every file under `local_dir`, then write the manifest last.

    With `overwrite` (a `--force` rerun) an existing manifest is removed first, so the
    old artifact stops counting before any of its files change. Without it, a second
    writer that finds a manifest already there loses: it raises instead of publishing.
    """
    local_dir = Path(local_dir)
    backend, prefix = open_store(uri)
    key = (lambda name: join(prefix, name)) if prefix else (lambda name: name)
    if overwrite:
        backend.delete(key(MANIFEST))
    elif backend.read_bytes(key(MANIFEST)) is not None:
        raise StorageError(f"{uri} is already published; rerun with --force to replace it")

    files: dict[str, dict] = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        name = path.relative_to(local_dir).as_posix()
        if name == MANIFEST:
            continue
        files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        backend.upload(path, key(name))

    manifest = {
        "schema": SCHEMA_VERSION,
        "phase": phase,
        "uri": uri,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": config,
        "config_hash": config_hash(identity if identity is not None else config),
        "inputs": inputs or {},
        "metrics": metrics or {},
        "timings": timings or {},
        "files": files,
    }
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    if not backend.write_bytes(key(MANIFEST), data, if_absent=True):
        raise StorageError(f"{uri}: another writer published this artifact first; not overwriting it")
    return manifest


def fetch(uri: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """(local directory with the artifact's files, manifest), every file checked against the manifest."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise InputError(f"{uri} is not published (no {MANIFEST}); run its phase first")
    backend, prefix = open_store(uri)
    key = (lambda name: join(prefix, name)) if prefix else (lambda name: name)

    in_place = backend.local_path(key(MANIFEST))
    if in_place is not None:
        root = in_place.parent
        for name, meta in manifest["files"].items():
            _verify(root / name, meta, f"{uri}/{name}")
        return root, manifest

    digest = manifest_digest(manifest)[:16]
    base = Path(cache_dir or os.environ.get("PIPELINE_CACHE", Path(tempfile.gettempdir()) / "pipeline-cache"))
    root = base / "artifacts" / digest
    for name, meta in manifest["files"].items():
        target = root / name
        if target.exists() and target.stat().st_size == meta["size"] and sha256_file(target) == meta["sha256"]:
            continue
        backend.download(key(name), target)
        _verify(target, meta, f"{uri}/{name}")
    return root, manifest


def _verify(path: Path, meta: dict, label: str) -> None:
    if not path.exists():
        raise InputError(f"{label}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != meta["size"]:
        raise InputError(f"{label}: size {size} does not match the manifest's {meta['size']} (truncated or replaced)")
    if sha256_file(path) != meta["sha256"]:
        raise InputError(f"{label}: SHA-256 does not match the manifest (corrupted or tampered)")


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
