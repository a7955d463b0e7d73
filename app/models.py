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
With `publish_bf16` (the phases pass it when they run in bf16 on a GPU), a checkpoint that has
only PyTorch `.bin` shards is read once, shard by shard, and published as bf16 safetensors in
`<store>/runs/<run-id>/base/`; every later phase (and vLLM) loads those, memory-mapped, instead
of unpickling 29 GB of fp32. The first phase to need it converts; the others find the manifest.
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


def resolve_base_model(ref: str, store: str, run_id: str, log=print, publish_bf16: bool = False) -> tuple[str, dict]:
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
        if publish_bf16 and bin_only(local):
            return _bf16_base(ref, local, store, run_id, log)
        return str(local), {"path": str(local.resolve())}
    if publish_bf16:
        hub_copy = _hub_bin_checkpoint(ref, log)
        if hub_copy is not None:
            return _bf16_base(ref, hub_copy, store, run_id, log)
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


WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")


def bin_only(path: Path) -> bool:
    """True when a model directory holds PyTorch `.bin` weight shards and no safetensors."""
    return any(path.glob("pytorch_model*.bin")) and not any(path.glob("*.safetensors"))


def _hub_bin_checkpoint(hub_id: str, log) -> Path | None:
    """A local copy of a hub model that ships only `.bin` shards (None for safetensors models, or offline)."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(hub_id)
        if any(f.endswith(".safetensors") for f in files) or not any(f.endswith(".bin") for f in files):
            return None
        log(f"base model: {hub_id} ships .bin shards only; downloading them once to publish bf16 safetensors")
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "pytorch_model*.bin", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - no hub (offline, no access): from_pretrained decides
        log(f"base model: could not list {hub_id} on the hub ({type(exc).__name__}); loading it as it is")
        return None


def _bf16_base(ref: str, source: Path, store: str, run_id: str, log) -> tuple[str, dict]:
    """The run's bf16 safetensors copy of `ref`, converted and published by the first caller."""
    from app.errors import ConfigError

    uri = artifacts.phase_uri(store, run_id, "base")
    manifest = artifacts.read_manifest(uri)
    if manifest is not None and manifest.get("config", {}).get("base_model") != ref:
        raise ConfigError(f"{uri} holds base model {manifest.get('config', {}).get('base_model')!r}, not {ref!r}; "
                          "use another --run-id")
    if manifest is None:
        started = time.time()
        log(f"base model: converting {source} (.bin shards) to bf16 safetensors for {uri}")
        with artifacts.workdir("base") as work:
            info = convert_to_bf16_safetensors(source, work, log=log)
            info["convert_s"] = round(time.time() - started, 1)
            try:
                artifacts.publish(work, uri, phase="base", config={"base_model": ref, "dtype": "bfloat16",
                                                                   "format": "safetensors"},
                                  metrics=info, timings={"total_s": round(time.time() - started, 1)})
            except Exception:
                if artifacts.read_manifest(uri) is None:
                    raise
                # Another phase or pod published the same conversion first; theirs is as good as ours.
        log(f"base model: published bf16 safetensors in {time.time() - started:.0f}s")
    path, manifest = artifacts.fetch(uri)
    return str(path), artifacts.lineage_entry(uri, manifest)


def convert_to_bf16_safetensors(source: str | Path, out_dir: str | Path, log=print) -> dict:
    """PyTorch `.bin` shards -> bf16 safetensors shards, one shard in memory at a time (memory-mapped);
    config, tokenizer and other small files are copied, the config's dtype set to bfloat16."""
    import shutil

    import torch
    from safetensors.torch import save_file

    source, out_dir = Path(source), Path(out_dir)
    index_file = source / "pytorch_model.bin.index.json"
    shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values())) if index_file.exists() \
        else ["pytorch_model.bin"]
    weight_map, total, started = {}, 0, time.time()
    for i, shard in enumerate(shards):
        state = torch.load(source / shard, map_location="cpu", mmap=True, weights_only=True)
        out = {name: (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous() for name, t in state.items()}
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(out, out_dir / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
        del state, out
        log(f"  converted {shard} -> {name} ({i + 1}/{len(shards)}, {time.time() - started:.0f}s)")
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != index_file.name:
            shutil.copyfile(path, out_dir / path.name)
    config_file = out_dir / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        config["torch_dtype"] = config["dtype"] = "bfloat16"
        config_file.write_text(json.dumps(config, indent=2))
    return {"shards": len(shards), "bytes": total}


def merge_adapter(base_path: str, adapter_dir: str | Path, out_dir: str | Path, bf16: bool = True,
                  log=print) -> None:
    """Write base + LoRA adapter as one plain model in `out_dir`: the update B·A·scale is added to the
    weights in fp32 and the sum rounded once to the serving dtype (bf16 on a GPU), the closest that
    dtype holds to the adapted weights; the tokenizer goes along, so vLLM can serve the directory."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.time()
    device = pick_device()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                 device_map=device if device != "cpu" else None)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(torch_dtype(bf16))
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_path).save_pretrained(out_dir)
    del model, merged
    import gc

    gc.collect()  # the fp32 copy must be gone before an engine sizes itself to the free memory
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"policy: adapter {adapter_dir} merged into the base weights in {time.time() - started:.0f}s -> {out_dir}")


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


def gpu_bf16(bf16: bool) -> bool:
    """True when a phase with `--bf16 {bf16}` will run in bf16 here (it has a GPU)."""
    return bool(bf16) and has_cuda()


def has_cuda() -> bool:
    """Whether a CUDA GPU is visible, asked through NVML, not the CUDA runtime: a process whose
    runtime is initialised can no longer fork vLLM's engine core ("Cannot re-initialize CUDA")."""
    import os

    import torch

    if torch.cuda.is_initialized():
        return True
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.is_available()
    finally:
        if previous is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK")
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


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
