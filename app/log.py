"""Plain, timestamped log lines that read well in `kubectl logs` (no colour codes, flushed)."""

from __future__ import annotations

import json
import os
import sys
import time

_STARTED = time.time()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if not is_main_process():
        return
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.time() - _STARTED:6.0f}s] {message}", file=sys.stdout, flush=True)


def banner(title: str) -> None:
    log("=" * 16 + f" {title} " + "=" * max(4, 60 - len(title)))


def log_config(config) -> None:
    log("config: " + json.dumps(config.to_dict(), sort_keys=True, default=str))
