"""Plain, timestamped log lines that read well in `kubectl logs` (no colour codes, flushed)."""

from __future__ import annotations

import json
import os
import re
import sys
import time

_STARTED = time.time()
# The user:password@ of a URI (http://user:SECRET@minio:9000): never printed, logged or saved.
_USERINFO = re.compile(r"(?<=://)[^/\s@'\"]+@")


def redact(text) -> str:
    """`text` with the credentials of every URI in it replaced by ***: http://***@host/..."""
    return _USERINFO.sub("***@", str(text))


def redact_values(value):
    """`redact` applied to every string inside a JSON-like value (a config saved in a manifest)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


def warn(message: str) -> None:
    """A line on stderr (warnings and errors), credentials redacted; every rank prints it."""
    print(redact(message), file=sys.stderr, flush=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if not is_main_process():
        return
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.time() - _STARTED:6.0f}s] {redact(message)}", file=sys.stdout, flush=True)


def banner(title: str) -> None:
    log("=" * 16 + f" {title} " + "=" * max(4, 60 - len(title)))


def log_config(config) -> None:
    log("config: " + json.dumps(config.to_dict(), sort_keys=True, default=str))


def progress(iterable=None, *, desc: str, **kwargs):
    """A tqdm bar for a long step: redrawn on a terminal; in a pod's log (not a terminal) a plain
    log line when it starts, every 30 s and when it ends, so `kubectl logs` shows it moving."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, **{"mininterval": 1, **kwargs})
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, desc=desc, **{**kwargs, "file": _LogLines(), "mininterval": 30, "ascii": True,
                                        "ncols": 100})


class _LogLines:
    """A file for tqdm that turns each redraw into one log line (repeats dropped)."""

    def __init__(self):
        self.last = ""

    def write(self, text: str) -> None:
        for piece in text.replace("\r", "\n").split("\n"):
            piece = piece.strip()
            if piece and piece != self.last:
                self.last = piece
                log(piece)

    def flush(self) -> None:
        pass
