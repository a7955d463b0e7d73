"""Loading the base model, its tokenizer and LoRA adapters.

`resolve_base_model` turns `--base-model` into something `from_pretrained` can open
and a lineage entry for the manifest:

    GAIR/Abel-7B-002      a hub id: loaded (and cached in HF_HOME) by transformers
    /models/abel          a local directory
    s3://bucket/.../base  a published artifact, fetched and checksum-verified
    tiny, small           a model built here (app/tiny.py): fetched from <store>/runs/<id>/base/,
                          built and published there by the first phase that needs it

Abel-7B-002 is stored as fp32 `.bin` shards; we always load in bf16 on a GPU (half the
memory, the precision it is trained in) and fp32 on the CPU, where bf16 matmuls are slow.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from app import artifacts
from app.config import BUILT_BASE_MODELS
from app.errors import InputError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_base_model(ref: str, store: str, run_id: str, log=print) -> tuple[str, dict]:
    """(path or hub id to load, lineage entry naming exactly which model it is)."""
    if ref in BUILT_BASE_MODELS:
        uri = artifacts.phase_uri(store, run_id, "base")
        if artifacts.read_manifest(uri) is None:
            _publish_built(ref, uri, log)
        path, manifest = artifacts.fetch(uri)
        return str(path), artifacts.lineage_entry(uri, manifest)
    local = Path(ref).expanduser()
    if artifacts.is_s3(ref) or (local / artifacts.MANIFEST).exists():
        path, manifest = artifacts.fetch(ref if artifacts.is_s3(ref) else str(local))
        return str(path), artifacts.lineage_entry(ref, manifest)
    if local.exists():
        return str(local), {"path": str(local.resolve())}
    return ref, {"hub_id": ref}


def check_base_model(ref: str) -> None:
    """Fail (exit 3) at once when `--base-model` names a local directory or an s3:// artifact that is
    not there, or something that is neither a path nor a hub id: before any model or data loads.
    A path that looks local (/x, ./x, ../x, ~/x) is never taken for a hub id."""
    if ref in BUILT_BASE_MODELS:
        return
    if artifacts.is_s3(ref):
        if artifacts.read_manifest(ref) is None:
            raise InputError(f"--base-model {ref}: not a published artifact (no {artifacts.MANIFEST} there)")
        return
    path = Path(ref).expanduser()
    if path.is_dir():
        if not any((path / name).exists() for name in ("config.json", artifacts.MANIFEST)):
            raise InputError(f"--base-model {ref}: no config.json in that directory; not a model")
        return
    if path.exists():
        raise InputError(f"--base-model {ref}: not a directory; give a model directory or a hub id (org/name)")
    if ref.startswith(("/", "./", "../", "~")) or ref in (".", ".."):
        raise InputError(f"--base-model {ref}: no such directory")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", ref):
        raise InputError(f"--base-model {ref!r}: neither a local directory nor a hub id (org/name)")


def _publish_built(name: str, uri: str, log) -> None:
    from app.tiny import build_base_model

    log(f"building the {name} base model here (tokenizer + Llama + warm-up pretraining)")
    started = time.time()
    with artifacts.workdir("base") as work:
        info = build_base_model(name, work, log=log)
        try:
            artifacts.publish(work, uri, phase="base", config={"base_model": name}, metrics=info,
                              timings={"total_s": round(time.time() - started, 1)})
        except Exception:
            if artifacts.read_manifest(uri) is None:
                raise
            # Someone else published the same deterministic model first; theirs is as good as ours.


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def torch_dtype(bf16: bool):
    import torch

    return torch.bfloat16 if bf16 and torch.cuda.is_available() else torch.float32


def load_causal_lm(path: str, bf16: bool = True, device: str | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(bf16), attn_implementation="sdpa")
    return model.to(device or pick_device())


def lora_config(r: int, alpha: int, dropout: float = 0.05):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM", bias="none")


BASE_SHAPE_FILE = "base_model_shape.json"


def model_shape(config) -> dict:
    return {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size}


def record_base_shape(adapter_dir: str | Path, base_model_config) -> None:
    """Save the base model's shape beside the adapter so readers can check they match."""
    (Path(adapter_dir) / BASE_SHAPE_FILE).write_text(json.dumps(model_shape(base_model_config), sort_keys=True))


def check_adapter_matches(adapter_dir: str | Path, base_model_config, label: str) -> None:
    """Refuse an adapter trained for another base model before it produces garbage."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise InputError(f"{label}: no adapter_config.json in {adapter_dir}")
    shape_file = adapter_dir / BASE_SHAPE_FILE
    if shape_file.exists():
        expected, actual = json.loads(shape_file.read_text()), model_shape(base_model_config)
        if expected != actual:
            raise InputError(f"{label}: adapter was trained for a base model of shape {expected}, "
                             f"but the base model here has shape {actual}")
