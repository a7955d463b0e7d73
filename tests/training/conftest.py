"""A tiny Mistral and a word-level tokenizer for the fast-path tests (built in well under a second)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def tiny():
    """(base model fp32 CPU, tokenizer, bench config): the bench's 'tiny' shape."""
    import torch

    from app.bench import Config, model as bench_model

    config = Config(shape="tiny", examples=32)
    model = bench_model.build_model(config, torch.device("cpu"))
    return model, bench_model.word_tokenizer(model.config.vocab_size), config


def random_sequences(n: int, seed: int = 0, vocab: int = 512):
    from app.training.packing import Sequence

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, completion = rng.randint(2, 12), rng.randint(1, 10)
        out.append(Sequence([rng.randrange(4, vocab) for _ in range(prompt + completion)],
                            [0] * prompt + [1] * completion))
    return out


def lora(base, r: int = 8, dropout: float = 0.0, b_std: float = 0.05, seed: int = 0):
    """A LoRA model whose B is not zero, so the adapter changes outputs and every gradient is non-zero."""
    import torch
    from peft import get_peft_model

    from app.models import lora_config

    torch.manual_seed(seed)  # LoRA A is drawn when the adapter is created: seed it too, not only B
    model = get_peft_model(base, lora_config(r, 2 * r, dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=b_std)
    return model
