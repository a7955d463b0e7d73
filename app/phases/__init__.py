"""The phases: each module has a docstring with its command, a `Config` dataclass and `main(config)`."""

from __future__ import annotations

from app import artifacts
from app.log import banner, log, log_config


def begin(name: str, out_uri: str, config, detail: str = "") -> dict | None:
    """Announce the phase, reach the store before any model loads, and return the published
    manifest when there is nothing to do (same config, same inputs, no --force)."""
    banner(f"{name}  run={config.run_id}" + (f"  {detail}" if detail else ""))
    log_config(config)
    artifacts.check_store(config.store)
    if config.force:
        return None
    artifacts.refuse_other_config(out_uri, config.identity())  # before any model or data loads
    if not artifacts.is_current(out_uri, config.identity()):
        return None
    log(f"{name}: {out_uri} is already published with this config; nothing to do (--force to redo)")
    return artifacts.read_manifest(out_uri)
