"""The embedded demo model: a tiny Llama and its tokenizer, built here, no hub needed.

`build_tiny_model(out_dir)` trains a byte-level BPE tokenizer (digits split one by one,
so arithmetic is learnable) on synthetic GSM8K-format text, creates a 4-layer Llama
(hidden 256, head dim 64, which vLLM's CPU kernels accept), and warms it up with a
short language-model pretraining on plain "question + solution" text. The warm-up
teaches arithmetic and GSM8K's solution style but never the tutoring prompt, so the
base model starts weak under the pipeline's prompt and SFT has something real to do.
Everything is seeded: the same seed gives the same tokenizer and initial weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from app.data import synthetic_problems

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


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


def tiny_config(vocab_size: int, hidden_size: int = 256, layers: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def build_tiny_model(out_dir: str | Path, seed: int = 0, warmup_steps: int = 300, batch_size: int = 32,
                     hidden_size: int = 256, layers: int = 4, log=print) -> dict:
    """Write a warmed-up tiny Llama and tokenizer to `out_dir`; returns what was done."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    corpus = [f"{r['question']}\n{r['answer']}" for r in synthetic_problems(4000, seed=seed + 1000, stream="train")]
    tokenizer = build_tokenizer(corpus)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), hidden_size, layers))

    losses = _warm_up(model, tokenizer, corpus, warmup_steps, batch_size, seed, log)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "warmup_steps": warmup_steps,
            "warmup_loss_first": losses[0] if losses else None, "warmup_loss_last": losses[-1] if losses else None}


def _warm_up(model, tokenizer, corpus, steps, batch_size, seed, log) -> list[float]:
    import random

    import torch

    if steps <= 0:
        return []
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses, started = [], time.time()
    for step in range(steps):
        texts = [t + tokenizer.eos_token for t in rng.sample(corpus, batch_size)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == steps - 1:
            log(f"  tiny base warm-up step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - started:.0f}s)")
    model.eval()
    return losses
