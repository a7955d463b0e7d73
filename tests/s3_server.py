"""A real S3 API for tests: moto's server on 127.0.0.1 over HTTP, reached by real boto3.

The code under test is configured exactly as in production, through AWS_ENDPOINT_URL and
the credential variables. Use it from a test module with

    from tests.s3_server import moto_endpoint, s3  # noqa: F401  (pytest fixtures)

`FlakyProxy` sits between the client and the server and can drop every connection for a
while, which is what a network outage or a restarting MinIO looks like to boto3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
# Anything from the developer's own AWS setup that could leak into the tests.
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS",
           "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "PIPELINE_S3_MULTIPART_MB", "PIPELINE_S3_ADDRESSING_STYLE")


@pytest.fixture(scope="session")
def moto_endpoint():
    """http://127.0.0.1:<port> of a moto S3 server running in this process for the whole test session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def point_at(setenv, delenv, endpoint: str, config_dir, **extra: str) -> None:
    """Set the standard AWS variables for `endpoint` (setenv/delenv: a MonkeyPatch's methods)."""
    for name in CLEARED:
        delenv(name, raising=False)
    # No ~/.aws files and no instance-metadata lookups (they would add seconds of timeouts).
    setenv("AWS_CONFIG_FILE", str(config_dir / "aws-config-absent"))
    setenv("AWS_SHARED_CREDENTIALS_FILE", str(config_dir / "aws-credentials-absent"))
    setenv("AWS_EC2_METADATA_DISABLED", "true")
    setenv("AWS_ENDPOINT_URL", endpoint)
    for name, value in {**TEST_CREDENTIALS, **extra}.items():
        setenv(name, value)


def raw_client(endpoint: str, **credentials: str):
    """A plain boto3 client for the test's own look at the bucket (listing, tampering)."""
    import boto3

    keys = {"aws_access_key_id": credentials.get("key", "testing"),
            "aws_secret_access_key": credentials.get("secret", "testing")}
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)


def new_bucket(endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    raw_client(endpoint).create_bucket(Bucket=name)
    return name


def keys_under(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@dataclass
class S3Place:
    endpoint: str
    bucket: str
    client: object  # raw boto3 client for the test itself

    @property
    def store(self) -> str:
        return f"s3://{self.bucket}/proj"

    def keys(self, prefix: str = "") -> list[str]:
        return keys_under(self.client, self.bucket, prefix)


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path) -> S3Place:
    """A fresh bucket on the test session's server, the environment pointed at it, a private cache."""
    point_at(monkeypatch.setenv, monkeypatch.delenv, moto_endpoint, tmp_path)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    return S3Place(moto_endpoint, new_bucket(moto_endpoint), raw_client(moto_endpoint))


@contextlib.contextmanager
def iam_authentication(endpoint: str):
    """Make the moto server check signatures and IAM policies, as AWS and MinIO do (off again after)."""
    import requests

    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def iam_user(endpoint: str, policy: dict) -> tuple[str, str]:
    """(access key id, secret) of a new IAM user with `policy` inline; call before iam_authentication."""
    import json

    import boto3

    iam = boto3.session.Session().client("iam", endpoint_url=endpoint, region_name="us-east-1",
                                         aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"user-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="pipeline", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


class FlakyProxy:
    """A TCP proxy to the S3 server that can go down (drop and refuse every connection) on demand."""

    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.down = threading.Event()
        self.bytes_up = 0  # client -> server, over all connections
        self._cut_at: int | None = None
        self._outage_s: float | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, nbytes: int, outage_s: float | None = None) -> None:
        """Go down once `nbytes` more have gone upstream; come back after `outage_s` (None: never)."""
        with self._lock:
            self._cut_at = self.bytes_up + nbytes
            self._outage_s = outage_s

    def go_down(self) -> None:
        self.down.set()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def go_up(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self._closed = True
        self.go_down()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream:
                    with self._lock:
                        self.bytes_up += len(data)
                        trip = self._cut_at is not None and self.bytes_up >= self._cut_at
                        if trip:
                            self._cut_at, outage = None, self._outage_s
                    if trip:
                        self.go_down()
                        if outage is not None:
                            threading.Timer(outage, self.go_up).start()
                        return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PUBLISH = "import sys; from app.artifacts import publish; publish(sys.argv[1], sys.argv[2], phase='sft', config={})"


def interrupted_dir(root) -> "os.PathLike":
    """Files to publish: two small ones first, then a 256 MiB sparse one whose hashing takes a while."""
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.json").write_text('{"small": true}')
    (root / "b.txt").write_text("also small\n")
    with open(root / "z.bin", "wb") as handle:
        handle.truncate(256 << 20)
    return root


def kill_publish_midway(local_dir, uri: str, started, timeout_s: float = 60.0) -> None:
    """Run `publish` in a child process and SIGKILL it as soon as `started()` sees some of its files."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _PUBLISH, str(local_dir), uri], cwd=REPO_ROOT)
    deadline = time.monotonic() + timeout_s
    try:
        while not started():
            assert proc.poll() is None, f"publish exited ({proc.returncode}) before it could be interrupted"
            assert time.monotonic() < deadline, "publish never started uploading"
            time.sleep(0.01)
        assert proc.poll() is None, "publish finished before it could be interrupted"
    finally:
        proc.kill()
        proc.wait()


class NoConditionalWritesProxy:
    """An HTTP proxy to the S3 server that answers like a store without conditional writes.

    Every PUT carrying `If-None-Match` gets `501 NotImplemented` (what S3-compatible servers
    without the feature answer); everything else is passed through unchanged.
    """

    def __init__(self, upstream: str):
        import http.client
        import http.server

        parsed = urlparse(upstream)
        host, port = parsed.hostname, parsed.port
        self.refused = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and "If-None-Match" in self.headers:
                    proxy.refused += 1
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                               b"<Message>A header you provided implies functionality that is not implemented"
                               b"</Message></Error>")
                    self.send_response(501)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(host, port, timeout=30)
                connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def publish_concurrently(dirs: list, uri: str, phase: str, config: dict) -> list:
    """Publish each of `dirs` to the same `uri` from its own thread, all released at once.

    Returns one result per writer: its manifest, or the StorageError it raised.
    """
    from app import artifacts
    from app.errors import StorageError

    barrier = threading.Barrier(len(dirs))
    results: list = [None] * len(dirs)

    def write(i: int) -> None:
        barrier.wait()
        try:
            results[i] = artifacts.publish(dirs[i], uri, phase=phase, config=config)
        except StorageError as exc:
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(dirs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
