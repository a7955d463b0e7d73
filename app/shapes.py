"""Random-weight models of a given shape, with a tokenizer, for rehearsing the pipeline before a download.

    info = write_random_model(SHAPES["abel-7b"], "/tmp/abel-shape", texts)

`SHAPES["abel-7b"]` is GAIR/Abel-7B-002's config exactly (MistralForCausalLM, hidden 4096,
32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 32032, sliding window 4096, rope theta
1e4); `SHAPES["tiny"]` has the same architecture at a size a CPU test runs in seconds.

The tokenizer is built here (no hub): byte-level BPE with digits split one by one, like
Llama's and Mistral's, trained on the given texts (GSM8K), then filled up with unused
tokens to the shape's vocabulary size, with Llama's special-token ids (<unk> 0, <s> 1, </s> 2).
Trained on GSM8K itself, it writes GSM8K in fewer tokens than Mistral's general-purpose
tokenizer does (docs/PERFORMANCE.md says what that means for the projections).

The weights are random (normal, std 0.02: the architecture's initialisation), so the model
answers nothing right and writes to the token limit; the shapes, and so the cost of every
matrix product, the memory and the bytes on disk, are the real model's. Written as bf16
safetensors, or, with `fp32_bin`, as fp32 PyTorch `.bin` shards as Abel ships them, to
rehearse the one-time conversion too (app/models.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

ABEL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32032, "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 4096,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
SHAPES: dict[str, dict] = {
    "abel-7b": ABEL_7B,
    # The same architecture at a size a CPU runs in seconds.
    "tiny": {**ABEL_7B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 4096},
}
MARKER = "rehearsal-model.json"  # written last: a directory without it is not a finished model
FP32_SHARD_BYTES = 10 * 1024 ** 3


def build_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """A BPE tokenizer trained on `texts`, exactly `vocab_size` tokens (unused ones fill the rest)."""
    from app.tiny import build_tokenizer as train_bpe

    tokenizer = train_bpe(texts, vocab_size=vocab_size)
    missing = vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<unused{i}>" for i in range(missing)])
    if len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the shape needs {vocab_size}")
    tokenizer.model_max_length = model_max_length
    tokenizer.padding_side = "left"
    return tokenizer


def read_marker(out_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_random_model(shape: dict, out_dir: str | Path, texts: list[str], fp32_bin: bool = False, seed: int = 0,
                       log=print) -> dict:
    """Write a random-weight model of `shape` (a config dict) and its tokenizer to `out_dir`; returns
    what was done and how long each part took. The marker file is written last."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    info: dict = {"shape": shape, "fp32_bin": fp32_bin}

    started = time.time()
    tokenizer = build_tokenizer(texts, shape["vocab_size"], shape["max_position_embeddings"])
    tokenizer.save_pretrained(out_dir)
    info["tokenizer_s"] = round(time.time() - started, 1)
    log(f"rehearse: tokenizer of {len(tokenizer)} tokens trained on {len(texts)} texts in {info['tokenizer_s']}s")

    started = time.time()
    config = AutoConfig.for_model(**{k: v for k, v in shape.items() if k != "architectures"})
    config.architectures = shape["architectures"]
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if fp32_bin or device == "cpu" else torch.bfloat16
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.config.dtype = "float32" if fp32_bin else "bfloat16"
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["init_s"] = round(time.time() - started, 1)
    log(f"rehearse: random {shape['architectures'][0]} of {info['parameters'] / 1e9:.2f} B parameters on {device} "
        f"in {info['init_s']}s")

    started = time.time()
    if fp32_bin:
        info["bytes"] = _save_fp32_bin(model, out_dir)
    else:
        model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size="5GB")
        info["bytes"] = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    model.config.save_pretrained(out_dir)
    info["write_s"] = round(time.time() - started, 1)
    log(f"rehearse: wrote {info['bytes'] / 1e9:.1f} GB ({'fp32 .bin' if fp32_bin else 'bf16 safetensors'}) "
        f"in {info['write_s']}s to {out_dir}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    (out_dir / MARKER).write_text(json.dumps(info, indent=2))
    return info


def _save_fp32_bin(model, out_dir: Path) -> int:
    """fp32 `pytorch_model-0000N-of-0000M.bin` shards of about 10 GB and their index, as Abel ships them."""
    import torch

    state = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > FP32_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, out_dir / file)
        weight_map.update({name: file for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (out_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total
