"""Checkpoints in the artifact store, so a preempted phase resumes instead of starting over.

    <phase uri>/checkpoints/00000400/manifest.json   one checkpoint: an artifact like any other,
    <phase uri>/checkpoints/00000400/attempt-*/...    published with the manifest written last
    <phase uri>/checkpoints/latest.json              the pointer: the complete checkpoints, newest last

A checkpoint is published exactly like a phase's artifact (`artifacts.publish`: files
first, manifest last), and only then does the pointer name it. So a pod killed while
uploading leaves a checkpoint without a manifest that nothing points at, and the
restarted pod resumes from the previous one. Readers never list: they read the pointer,
then the manifest it names, and verify every file (`artifacts.fetch`).

Each checkpoint records the hash of the phase's config (`artifacts.config_hash` of
`config.identity()`, the same hash the phase's manifest carries). A checkpoint written
under another config is never resumed: the phase starts fresh and says so.

Used three ways:
- `trainer_callback(...)`, a transformers `TrainerCallback`: every `save_steps` the HF
  Trainer writes `checkpoint-<step>/` (adapter, optimizer, scheduler, RNG states,
  trainer_state.json with the step); the callback publishes it. The phase then calls
  `trainer.train(resume_from_checkpoint=latest_checkpoint(...))`, and the Trainer's own
  resume restores everything and skips the batches already trained on.
- Any directory to resume from: `save_checkpoint` publishes it, `latest_checkpoint`
  finds the newest complete one of the same config and verifies it.
- Chunked progress (rollouts): one checkpoint per finished chunk of questions, kept all;
  `complete_checkpoints` returns every one of them in order.

After the phase publishes its artifact, `clear_checkpoints` removes them (best effort).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from app import artifacts
from app.errors import InputError, PipelineError, StorageError
from app.log import warn

POINTER = "latest.json"
META = "checkpoint.json"  # written into every checkpoint: step, config hash, data position


def checkpoints_uri(phase_uri: str) -> str:
    return artifacts.join(phase_uri, "checkpoints")


def checkpoint_uri(phase_uri: str, step: int) -> str:
    return artifacts.join(phase_uri, "checkpoints", f"{step:08d}")


def _say(message: str) -> None:
    warn(message)


# ---------------------------------------------------------------------------------------------
# The pointer


def read_pointer(phase_uri: str, log: Callable[[str], None] = _say) -> list[dict]:
    """The complete checkpoints the pointer names, oldest first ([] when there is none)."""
    backend, prefix = artifacts.open_store(checkpoints_uri(phase_uri))
    raw = backend.read_bytes(artifacts.join(prefix, POINTER) if prefix else POINTER)
    if raw is None:
        return []
    try:
        entries = json.loads(raw)["checkpoints"]
        assert isinstance(entries, list) and all(isinstance(e["step"], int) for e in entries)
    except (ValueError, KeyError, TypeError, AssertionError):
        # Our own small file, so this is storage damage: losing the checkpoints is better than failing the Job.
        log(f"warning: {artifacts.join(checkpoints_uri(phase_uri), POINTER)} is damaged; ignoring its checkpoints")
        return []
    return sorted(entries, key=lambda e: e["step"])


def _write_pointer(phase_uri: str, entries: list[dict]) -> None:
    backend, prefix = artifacts.open_store(checkpoints_uri(phase_uri))
    data = json.dumps({"checkpoints": entries}, indent=2, sort_keys=True).encode()
    backend.write_bytes(artifacts.join(prefix, POINTER) if prefix else POINTER, data)


# ---------------------------------------------------------------------------------------------
# Save, find, remove


def save_checkpoint(phase_uri: str, step: int, local_dir: str | os.PathLike, config_hash: str, *,
                    meta: dict | None = None, keep: int | None = 2) -> dict:
    """Publish `local_dir` as checkpoint `step` of the phase at `phase_uri`, then point at it.

    `meta` (the data position, say) is stored in the checkpoint's `checkpoint.json` and in its
    manifest's metrics. `keep`: how many of the newest checkpoints to keep (None: all, for
    chunked progress where each checkpoint holds different records). Checkpoints of another
    config are dropped from the pointer and deleted. Returns the checkpoint's manifest.
    """
    local_dir = Path(local_dir)
    info = {"step": step, "config_hash": config_hash, **(meta or {})}
    (local_dir / META).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    uri = checkpoint_uri(phase_uri, step)
    # overwrite: a restart that resumed from an earlier checkpoint redoes the steps after it, and
    # may reach a step whose checkpoint a killed pod published but never pointed at.
    manifest = artifacts.publish(local_dir, uri, phase="checkpoint", config=info,
                                 identity={"config_hash": config_hash, "step": step}, metrics=meta, overwrite=True)
    entry = {"step": step, "uri": uri, "config_hash": config_hash,
             "manifest_sha256": artifacts.manifest_digest(manifest)}
    previous = read_pointer(phase_uri)
    same = [e for e in previous if e.get("config_hash") == config_hash and e["step"] < step] + [entry]
    kept = same if keep is None else same[-keep:]
    _write_pointer(phase_uri, kept)
    # Only now, with the pointer no longer naming them, may old checkpoints go.
    named = {e["uri"] for e in kept}
    for old in previous:
        if old.get("uri") and old["uri"] not in named:
            _remove(old["uri"])
    return manifest


def latest_checkpoint(phase_uri: str, config_hash: str, log: Callable[[str], None] = _say) -> Path | None:
    """A local directory with the newest complete checkpoint of this config, verified; None to start fresh.

    The directory is a private copy in the cache, on a local store too: the run that resumes
    from it publishes newer checkpoints, and their rotation deletes this one from the store."""
    found = _usable(phase_uri, config_hash, log, newest_only=True)
    return found[-1][1] if found else None


def checkpoint_info(path: str | os.PathLike) -> dict:
    """The checkpoint.json of a checkpoint directory: step, config_hash and the data position."""
    return json.loads((Path(path) / META).read_text())


def complete_checkpoints(phase_uri: str, config_hash: str,
                         log: Callable[[str], None] = _say) -> list[tuple[int, Path]]:
    """(step, local directory) of every complete checkpoint of this config, oldest first."""
    return _usable(phase_uri, config_hash, log, newest_only=False)


def _usable(phase_uri: str, config_hash: str, log, newest_only: bool) -> list[tuple[int, Path]]:
    entries = read_pointer(phase_uri, log)
    other = [e for e in entries if e.get("config_hash") != config_hash]
    if other:
        log(f"checkpoints: ignoring {len(other)} checkpoint(s) in {checkpoints_uri(phase_uri)} made with another "
            f"config (hash {other[-1].get('config_hash')}, this run {config_hash}); not resuming from them")
    mine = [e for e in entries if e.get("config_hash") == config_hash]
    found: list[tuple[int, Path]] = []
    # Newest first when one is wanted (a damaged newest falls back to the one before it); oldest
    # first when all are (chunked progress keeps the unbroken prefix before a damaged one).
    for entry in (reversed(mine) if newest_only else mine):
        path = _verified(phase_uri, entry, config_hash, log)
        if path is None:
            if newest_only:
                continue
            break
        found.append((entry["step"], path))
        if newest_only:
            break
    return found


def _verified(phase_uri: str, entry: dict, config_hash: str, log) -> Path | None:
    uri = entry.get("uri", "")
    try:
        manifest = artifacts.read_manifest(uri)
        if manifest is None or artifacts.manifest_digest(manifest) != entry.get("manifest_sha256"):
            log(f"warning: checkpoint {uri} is missing or was replaced since the pointer named it; skipping it")
            return None
        path, _ = artifacts.fetch(uri, cache_dir=_cache(phase_uri), private=True)
        info = json.loads((path / META).read_text())
    except (InputError, OSError, ValueError) as exc:
        log(f"warning: checkpoint {uri} cannot be used ({exc}); skipping it")
        return None
    if info.get("config_hash") != config_hash or info.get("step") != entry["step"]:
        log(f"warning: checkpoint {uri} records step {info.get('step')} / config {info.get('config_hash')}, "
            f"not what the pointer says; skipping it")
        return None
    return path


def _remove(uri: str) -> None:
    """Unpublish a checkpoint: manifest first (it stops counting), then its files. Best effort."""
    try:
        manifest = artifacts.read_manifest(uri)
        if manifest is None:
            return
        backend, prefix = artifacts.open_store(uri)
        key = (lambda name: artifacts.join(prefix, name)) if prefix else (lambda name: name)
        backend.delete(key(artifacts.MANIFEST))
        data_dir = manifest.get("data_dir", "")
        for name in manifest.get("files", {}):
            backend.delete(key(artifacts.join(data_dir, name) if data_dir else name))
    except (PipelineError, OSError) as exc:
        _say(f"warning: could not remove old checkpoint {uri} ({exc}); it is unreferenced and safe to delete")


def clear_checkpoints(phase_uri: str, scratch: str | os.PathLike | None = None) -> None:
    """Remove the pointer and every checkpoint it names, once the phase's artifact is published,
    the local copies resumed from, and the Trainer's `scratch` directory (`artifacts.trainer_dir`)."""
    if _local_rank() == 0:
        for local in (scratch, _cache(phase_uri)):
            if local is not None:
                shutil.rmtree(local, ignore_errors=True)
    try:
        entries = read_pointer(phase_uri)
        if not entries:
            return
        backend, prefix = artifacts.open_store(checkpoints_uri(phase_uri))
        backend.delete(artifacts.join(prefix, POINTER) if prefix else POINTER)
    except (PipelineError, OSError) as exc:
        _say(f"warning: could not clear the checkpoints of {phase_uri} ({exc})")
        return
    for entry in entries:
        _remove(entry["uri"])


def _cache(phase_uri: str) -> Path:
    """Where this phase's checkpoints are copied to be resumed from (one directory per phase)."""
    return artifacts.cache_base() / "checkpoints" / hashlib.sha256(phase_uri.encode()).hexdigest()[:16]


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# ---------------------------------------------------------------------------------------------
# HF Trainer


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def trainer_callback(phase_uri: str, config_hash: str, keep: int = 2, log: Callable[[str], None] = _say):
    """A `TrainerCallback` that publishes each checkpoint the Trainer saves (see the module docstring)."""
    from transformers import TrainerCallback

    class TrainerCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            # Every rank writes its own rng_state_<rank>.pth; wait for all before rank 0 uploads.
            _barrier()
            # The last step's state is the phase's artifact, published right after: no checkpoint needed.
            if state.is_world_process_zero and state.global_step < state.max_steps:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                meta = {"epoch": state.epoch, "max_steps": state.max_steps, "examples_per_step": per_step,
                        "examples_seen": state.global_step * per_step}
                try:
                    save_checkpoint(phase_uri, state.global_step, folder, config_hash, meta=meta, keep=keep)
                    log(f"checkpoint: step {state.global_step}/{state.max_steps} saved to "
                        f"{checkpoint_uri(phase_uri, state.global_step)}")
                except StorageError as exc:
                    # Training goes on; the pointer still names the previous complete checkpoint.
                    log(f"warning: checkpoint at step {state.global_step} not saved ({exc}); training goes on")
            return control

    return TrainerCheckpoints()


def restore_trained_adapter(model, checkpoint_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load the trained adapter of a Trainer checkpoint into `model` (a PeftModel), in place.

    Needed for DPO: its model holds two adapters, the trained `default` (saved at the
    checkpoint's top level) and TRL's frozen `ref` copy (saved in `ref/`). The Trainer's resume
    sees the `ref/` subdirectory and loads only that, leaving `default` as it started, so a
    resumed DPO run would silently restart from the SFT weights. Call this after the trainer
    is built (TRL has copied `default` into `ref` by then) and before `train`.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_peft_weights(str(checkpoint_dir)), adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise InputError(f"{checkpoint_dir}: adapter does not fit the model ({unexpected[:2]} ...)")

