"""S3-compatible artifact storage (AWS S3, MinIO, ...) behind the same Backend as a local directory.

Configured only through the standard AWS variables, so one Kubernetes Secret works for
boto3, the aws CLI and mc alike:

    AWS_ENDPOINT_URL        http://minio.minio.svc:9000 for MinIO; unset for AWS S3
    AWS_ACCESS_KEY_ID       \\ or any other source boto3's default chain knows
    AWS_SECRET_ACCESS_KEY   / (AWS_SESSION_TOKEN, IRSA web identity, instance profile)
    AWS_REGION              us-east-1 if unset and an endpoint is given
    AWS_MAX_ATTEMPTS        botocore attempts per request (standard retry mode), default 5

and two of ours: PIPELINE_S3_MULTIPART_MB (multipart threshold and part size, default 64)
and PIPELINE_S3_ADDRESSING_STYLE (path|virtual; default path when AWS_ENDPOINT_URL is set,
since MinIO behind a Kubernetes Service name has no per-bucket DNS).

Every boto3 error leaves this module as one of ours (app.errors) with a one-line message:
ConfigError (exit 2: missing bucket, rejected credentials, denied permission -- retrying
cannot help), InputError (exit 3: an object the manifest names is missing) or StorageError
(exit 1: endpoint unreachable, 5xx, throttling -- the Job retries). Whole-file uploads and
downloads are retried here a few times on top of botocore's per-request retries, because
a multi-GB checkpoint should not be lost to one dropped connection.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path

from app.errors import ConfigError, InputError, PipelineError, StorageError
from app.log import warn

MIB = 1 << 20
FILE_ATTEMPTS = 3  # whole-file transfers, each made of botocore requests with their own retries
FILE_RETRY_DELAY_S = 1.0  # 1 s, then 2 s
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "InvalidClientTokenId", "UnrecognizedClientException"}
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                   "Throttling", "ThrottlingException", "OperationAborted", "RequestLimitExceeded"}
PERMISSIONS_HINT = ("the pipeline needs s3:ListBucket on the bucket (no listing is done, but HeadBucket and "
                    "404-for-missing-keys require it) and s3:GetObject, s3:PutObject, s3:DeleteObject on the prefix")


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{uri!r}: no bucket name; use s3://<bucket>/<prefix>")
    return bucket, key.strip("/")


def open_s3(uri: str) -> tuple["S3Backend", str]:
    """(backend for the bucket, key prefix) for an s3:// URI."""
    bucket, prefix = split_uri(uri)
    return S3Backend(bucket, prefix), prefix


# ---------------------------------------------------------------------------------------------
# Clients: built from the environment, cached per distinct configuration (tests change it).

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
# Per endpoint: whether the server honours If-None-Match on PutObject (None: not yet known).
_conditional: dict[str, bool] = {}


def _settings() -> dict:
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None)
    style = env.get("PIPELINE_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
    if style not in ("path", "virtual", "auto"):
        raise ConfigError(f"PIPELINE_S3_ADDRESSING_STYLE={style!r}: use path, virtual or auto")
    try:
        attempts = int(env.get("AWS_MAX_ATTEMPTS") or 5)
    except ValueError:
        raise ConfigError(f"AWS_MAX_ATTEMPTS={env['AWS_MAX_ATTEMPTS']!r} is not an integer") from None
    return {"endpoint": endpoint, "region": region, "style": style, "attempts": max(1, attempts),
            # credentials are part of the key so a changed Secret/env gets a new client
            "creds": (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"),
                      env.get("AWS_SESSION_TOKEN"), env.get("AWS_PROFILE"))}


def client(fast: bool = False):
    """A boto3 S3 client; `fast` gives short timeouts and few attempts for the startup check."""
    settings = _settings()
    key = (fast, settings["endpoint"], settings["region"], settings["style"], settings["attempts"], settings["creds"])
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(
                region_name=settings["region"],
                retries={"mode": "standard", "max_attempts": 2 if fast else settings["attempts"]},
                connect_timeout=3 if fast else 10,
                read_timeout=10 if fast else 120,
                s3={"addressing_style": settings["style"]},
                max_pool_connections=16,
            )
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=settings["endpoint"], config=config)
        return _clients[key]


def multipart_bytes() -> int:
    raw = os.environ.get("PIPELINE_S3_MULTIPART_MB", "64")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"PIPELINE_S3_MULTIPART_MB={raw!r} is not an integer") from None
    if value < 5:
        raise ConfigError(f"PIPELINE_S3_MULTIPART_MB={value}: S3 parts must be at least 5 MiB")
    return value * MIB


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    size = multipart_bytes()
    # Parts are uploaded 8 at a time; s3transfer raises the part size itself past 10,000 parts.
    return TransferConfig(multipart_threshold=size, multipart_chunksize=size, max_concurrency=8, use_threads=True)


class _Progress:
    """A tqdm bar for transfers of big files (at least one multipart part); silent otherwise."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if total >= multipart_bytes():
            from tqdm import tqdm

            # Pod logs are not terminals: a line every 30 s instead of a redraw per chunk.
            interval = 0.5 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, mininterval=interval, leave=True)

    def __call__(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.update(amount)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Errors


def _error_code(exc) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _root_cause(exc: BaseException) -> BaseException:
    """boto3 wraps the real botocore error in S3UploadFailedError / RetriesExceededError."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return _root_cause(exc.last_exception)
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return _root_cause(exc.__context__)
    return exc


# ---------------------------------------------------------------------------------------------
# The backend


class S3Backend:
    """Keys are full object keys in one bucket; `prefix` is where `check` may write its probe."""

    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket = bucket
        self.prefix = prefix
        self.client = client()
        self.endpoint = self.client.meta.endpoint_url

    @property
    def conditional_writes(self) -> bool | None:
        return _conditional.get(self.endpoint)

    @conditional_writes.setter
    def conditional_writes(self, value: bool) -> None:
        _conditional[self.endpoint] = value

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def translate(self, exc: BaseException, action: str, key: str | None = None) -> PipelineError:
        """One of our errors, with a one-line message, for any boto3/botocore failure."""
        from botocore import exceptions as bx

        exc = _root_cause(exc)
        where = self.url(key) if key is not None else f"bucket {self.bucket!r}"
        if isinstance(exc, PipelineError):
            return exc
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return ConfigError(f"no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "or give the pod an IAM role")
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
            return StorageError(f"cannot reach the S3 endpoint {self.endpoint} to {action} {where}: {exc}")
        if isinstance(exc, bx.ClientError):
            code, status = _error_code(exc)
            message = exc.response.get("Error", {}).get("Message", "") or str(exc)
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return ConfigError(f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it first "
                                   f"(aws s3 mb s3://{self.bucket}, or mc mb <alias>/{self.bucket})")
            if code in AUTH_CODES:
                return ConfigError(f"S3 at {self.endpoint} rejected the credentials ({code}: {message}); "
                                   "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
            if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") \
                    or status == 301:
                region = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
                hint = f"set AWS_REGION={region}" if region else "set AWS_REGION to the bucket's region"
                return ConfigError(f"bucket {self.bucket!r} is in another region ({code or status}); {hint}")
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
                return ConfigError(f"access denied to {action} {where} at {self.endpoint}; {PERMISSIONS_HINT}")
            if code in ("NoSuchKey", "404", "NotFound"):
                return InputError(f"{where}: no such object")
            if code in TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return StorageError(f"S3 at {self.endpoint} failed to {action} {where}: {code or status} {message}")
            return StorageError(f"S3 at {self.endpoint} refused to {action} {where}: {code or status} {message}")
        return StorageError(f"failed to {action} {where} at {self.endpoint}: {type(exc).__name__}: {exc}")

    def _retrying(self, action: str, key: str, fn):
        """Run a whole-file transfer, again after a pause when it failed for a transient reason."""
        for attempt in range(1, FILE_ATTEMPTS + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - every failure is classified by translate()
                error = self.translate(exc, action, key)
                if type(error) is not StorageError or attempt == FILE_ATTEMPTS:
                    raise error from exc
                delay = FILE_RETRY_DELAY_S * 2 ** (attempt - 1)
                warn(f"warning: {error} -- retrying in {delay:.0f} s (attempt {attempt + 1}/{FILE_ATTEMPTS})")
                time.sleep(delay)

    # -- Backend protocol ------------------------------------------------------------------------

    def check(self) -> None:
        """HeadBucket, then write and delete a probe object under the prefix, with short timeouts.

        Runs before any model loads, so a missing bucket, wrong credentials, a missing
        permission or an unreachable endpoint cost seconds, not a failed multi-hour job.
        """
        fast = client(fast=True)
        try:
            fast.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001
            error = self.translate(exc, "reach")
            code, status = _error_code(_root_cause(exc))
            # HEAD responses carry no error code: ask once more with a GET to tell bad credentials from
            # a missing permission, and a missing bucket from an endpoint that is no S3 server at all.
            if isinstance(error, ConfigError) and status == 403:
                error = self._explain_forbidden(fast)
            elif isinstance(error, ConfigError) and status == 404:
                error = self._explain_not_found(fast)
            if error is not None:
                raise error from None

        probe = "/".join(p for p in (self.prefix, f".pipeline-check-{uuid.uuid4().hex[:12]}") if p)
        try:
            self._put(fast, probe, b"", if_absent=True)
            fast.delete_object(Bucket=self.bucket, Key=probe)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.translate(exc, "write", probe) from None

    def _explain_not_found(self, fast) -> PipelineError | None:
        probe = "/".join(p for p in (self.prefix, ".pipeline-check-absent") if p)
        try:
            fast.get_object(Bucket=self.bucket, Key=probe)
        except Exception as exc:  # noqa: BLE001
            code, status = _error_code(_root_cause(exc))
            if code == "NoSuchBucket":
                return self.translate(exc, "reach")
            if code in ("NoSuchKey",):
                return None  # the bucket exists after all (created a moment ago)
            if status == 404:
                return ConfigError(f"{self.endpoint} answered 404 without an S3 error code: is AWS_ENDPOINT_URL "
                                   f"the address of an S3 API (and bucket {self.bucket!r} right)?")
            return self.translate(exc, "reach")
        return None

    def _explain_forbidden(self, fast) -> PipelineError:
        probe = "/".join(p for p in (self.prefix, ".pipeline-check-absent") if p)
        try:
            fast.get_object(Bucket=self.bucket, Key=probe)
        except Exception as exc:  # noqa: BLE001
            code, _ = _error_code(_root_cause(exc))
            if code in ("NoSuchKey", "404"):
                return ConfigError(f"access denied to HeadBucket on {self.bucket!r} at {self.endpoint}: the "
                                   f"credentials lack s3:ListBucket on arn:aws:s3:::{self.bucket} (nothing is "
                                   "listed, but HeadBucket and 404-for-missing-manifests need it)")
            return self.translate(exc, "read", probe)
        return ConfigError(f"access denied to HeadBucket on {self.bucket!r}; {PERMISSIONS_HINT}")

    def read_bytes(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            error = self.translate(exc, "read", key)
            if isinstance(error, InputError):  # NoSuchKey: simply not there
                return None
            raise error from None

    def _put(self, s3, key: str, data: bytes, *, if_absent: bool) -> bool:
        from botocore.exceptions import ClientError

        if if_absent and self.conditional_writes is not False:
            try:
                s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
                self.conditional_writes = True
                return True
            except ClientError as exc:
                code, status = _error_code(exc)
                if code == "PreconditionFailed" or status == 412:
                    self.conditional_writes = True
                    return False
                if code == "ConditionalRequestConflict" or status == 409:
                    # AWS: another conditional write of this key is in flight; it will win or fail on
                    # its own. Either way we did not publish.
                    return False
                if code != "NotImplemented" and status != 501:
                    raise self.translate(exc, "write", key) from None
                self.conditional_writes = False
                warn(f"warning: {self.endpoint} does not support conditional writes (If-None-Match); "
                      "falling back to check-then-write with a read-back check")
        if if_absent:
            # Fallback: narrows, does not close, the race; publish() reads the manifest back to
            # notice when a concurrent writer overwrote ours.
            if self.read_bytes(key) is not None:
                return False
        s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return True

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        try:
            return self._put(self.client, key, data, if_absent=if_absent)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.translate(exc, "write", key) from None

    def upload(self, local_path: Path, key: str) -> None:
        local_path = Path(local_path)
        size = local_path.stat().st_size

        def attempt():
            progress = _Progress(size, f"upload {local_path.name}")
            try:
                self.client.upload_file(str(local_path), self.bucket, key, Config=transfer_config(),
                                        Callback=progress)
            finally:
                progress.close()

        self._retrying("upload", key, attempt)

    def size(self, key: str) -> tuple[int, str] | None:
        """(size, ETag) of an object, or None when there is none."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            error = self.translate(exc, "read", key)
            if isinstance(error, InputError):
                return None
            raise error from None
        return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')

    def download(self, key: str, local_path: Path) -> None:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)

        def attempt():
            head = self.size(key)
            if head is None:
                raise InputError(f"{self.url(key)}: listed in the manifest but missing")
            progress = _Progress(head[0], f"download {local_path.name}")
            try:
                # s3transfer writes to a temporary name and renames, so a reader never sees half a file.
                self.client.download_file(self.bucket, key, str(local_path), Config=transfer_config(),
                                          Callback=progress)
            finally:
                progress.close()

        self._retrying("download", key, attempt)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            error = self.translate(exc, "delete", key)
            if not isinstance(error, InputError):
                raise error from None

    def local_path(self, key: str) -> Path | None:
        return None
