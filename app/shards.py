"""Splitting a phase's questions over the pods of an Indexed Job, and joining the results.

Shard i of N takes a contiguous block of the questions (so concatenating the shards
in index order restores question order) and publishes its own artifact at
`<phase>/shards/<i>/` with its own manifest. The merge step reads exactly the N
manifests it was told to expect, never a listing, and publishes the phase artifact.
"""

from __future__ import annotations

import os

from app import artifacts
from app.errors import InputError


def shard_bounds(total: int, index: int, num_shards: int) -> tuple[int, int]:
    """[start, end) of shard `index`; sizes differ by at most one."""
    base, extra = divmod(total, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_slice(items: list, index: int, num_shards: int) -> list:
    start, end = shard_bounds(len(items), index, num_shards)
    return items[start:end]


def shard_uri(phase_uri: str, index: int) -> str:
    return artifacts.join(phase_uri, "shards", f"{index:05d}")


def default_shard_index() -> int:
    """This pod's shard: Kubernetes sets JOB_COMPLETION_INDEX in each pod of an Indexed Job."""
    return int(os.environ.get("JOB_COMPLETION_INDEX", "0"))


def output_uri(config, phase: str) -> str:
    """Where a sharded phase (rollouts, eval) publishes: its own artifact, or its shard's."""
    uri = artifacts.phase_uri(config.store, config.run_id, phase, getattr(config, "round", 1))
    return shard_uri(uri, config.shard_index) if config.num_shards > 1 else uri


def fetch_shards(phase_uri: str, num_shards: int) -> list[tuple]:
    """[(local dir, manifest, uri)] for every shard, or an error naming the ones missing."""
    missing = [i for i in range(num_shards) if artifacts.read_manifest(shard_uri(phase_uri, i)) is None]
    if missing:
        raise InputError(f"{phase_uri}: shards {missing} of {num_shards} are not published yet")
    out = []
    for i in range(num_shards):
        uri = shard_uri(phase_uri, i)
        path, manifest = artifacts.fetch(uri)
        out.append((path, manifest, uri))
    return out
