"""Base models built here, no hub needed: `tiny` (the embedded demo) and `small` (the proving ground).

`build_tiny_model(out_dir)` trains a byte-level BPE tokenizer (digits split one by one,
so arithmetic is learnable) on synthetic GSM8K-format text, creates a 4-layer Llama
(hidden 256, head dim 64, which vLLM's CPU kernels accept), and warms it up with a
short language-model pretraining on plain "question + solution" text. The warm-up
teaches arithmetic and GSM8K's solution style but never the tutoring prompt, so the
base model starts weak under the pipeline's prompt and SFT has something real to do.
Everything is seeded: the same seed gives the same tokenizer and initial weights.

`small` is the same recipe at a size where preference training can matter: 8 layers,
hidden 512, MLP 2048 (30.9 M parameters; BPE stops at 508 tokens on this corpus), pretrained for
600 steps of 256 texts of the harder synthetic family (`synthetic-hard`: 2-4 steps, numbers up
to the thousands, distractor sentences), on the GPU in bf16 when there is one.

Pretraining cost of `small`, measured on one H200: the corpus and tokenizer 38 s, the 600 steps
171 s (loss 6.38 -> 0.237). A step of this model is bound by kernel launches, not arithmetic
(~0.16 s a step at 128 texts, ~0.28 s at 256), so the build takes few large steps: at 4,000 steps
of 128 texts the loss had only reached 0.227 at step 2,601, after 7 minutes. On the 2-core CPU
it would take hours: CPU tests build it at a reduced size
(`build_base_model("small", ..., warmup_steps=..., hidden_size=...)`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from app.data import synthetic_hard_problems, synthetic_problems

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# What each built base model is: its pretraining corpus, tokenizer, shape and warm-up.
BUILDS: dict[str, dict] = {
    "tiny": {"corpus": "synthetic", "corpus_size": 4000, "vocab_size": 640, "hidden_size": 256, "layers": 4,
             "intermediate_size": 512, "warmup_steps": 300, "batch_size": 32, "learning_rate": 3e-3,
             "device": "cpu"},
    "small": {"corpus": "synthetic-hard", "corpus_size": 100_000, "vocab_size": 512, "hidden_size": 512,
              "layers": 8, "intermediate_size": 2048, "warmup_steps": 600, "batch_size": 256,
              "learning_rate": 1e-3, "device": "auto"},
}


def build_tokenizer(texts: list[str], vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", model_max_length=512)


def tiny_config(vocab_size: int, hidden_size: int = 256, layers: int = 4, intermediate_size: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=intermediate_size or hidden_size * 2,
                       num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def build_tiny_model(out_dir: str | Path, seed: int = 0, warmup_steps: int = 300, batch_size: int = 32,
                     hidden_size: int = 256, layers: int = 4, log=print) -> dict:
    """Write a warmed-up tiny Llama and tokenizer to `out_dir`; returns what was done."""
    return build_base_model("tiny", out_dir, seed=seed, log=log, warmup_steps=warmup_steps, batch_size=batch_size,
                            hidden_size=hidden_size, layers=layers, intermediate_size=hidden_size * 2)


def build_base_model(name: str, out_dir: str | Path, seed: int = 0, log=print, **overrides) -> dict:
    """Write the built base model `name` (`BUILDS`, with `overrides` for reduced sizes) to `out_dir`."""
    import torch
    from transformers import LlamaForCausalLM

    spec = {**BUILDS[name], **overrides}
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    generate = synthetic_hard_problems if spec["corpus"] == "synthetic-hard" else synthetic_problems
    corpus = [f"{r['question']}\n{r['answer']}" for r in generate(spec["corpus_size"], seed=seed + 1000, stream="train")]
    tokenizer = build_tokenizer(corpus, spec["vocab_size"])
    model = LlamaForCausalLM(tiny_config(len(tokenizer), spec["hidden_size"], spec["layers"], spec["intermediate_size"]))
    parameters = sum(p.numel() for p in model.parameters())
    log(f"  {name} base: {parameters / 1e6:.1f} M parameters, {spec['layers']} layers, hidden {spec['hidden_size']}; "
        f"warm-up {spec['warmup_steps']} steps x {spec['batch_size']} texts of {spec['corpus']}")

    losses = _warm_up(model, tokenizer, corpus, spec["warmup_steps"], spec["batch_size"], seed, log,
                      learning_rate=spec["learning_rate"], device=spec["device"])
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": parameters, "warmup_steps": spec["warmup_steps"],
            "warmup_loss_first": losses[0] if losses else None, "warmup_loss_last": losses[-1] if losses else None}


def _warm_up(model, tokenizer, corpus, steps, batch_size, seed, log, learning_rate: float = 3e-3,
             device: str = "cpu") -> list[float]:
    import contextlib
    import random

    import torch

    if steps <= 0:
        return []
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    # bf16 autocast on a GPU (fp32 master weights); the CPU stays in fp32, where the tiny demo was measured.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses, started = [], time.time()
    for step in range(steps):
        texts = [t + tokenizer.eos_token for t in rng.sample(corpus, batch_size)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with autocast:
            loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step % (50 if steps <= 1000 else 200) == 0 or step == steps - 1:
            log(f"  base warm-up step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - started:.0f}s)")
    model.eval()
    model.to("cpu")
    return losses
