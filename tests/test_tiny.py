"""The base models built here: `small` (the proving ground) at its full shape on the meta device,
and built for real (tokenizer, pretraining, saved model) at a reduced size on the CPU."""

import pytest


def test_small_is_tens_of_millions_of_parameters():
    import torch
    from transformers import LlamaForCausalLM

    from app.tiny import BUILDS, tiny_config

    spec = BUILDS["small"]
    with torch.device("meta"):  # the full shape without allocating it; BPE stops at 508 tokens on its corpus
        model = LlamaForCausalLM(tiny_config(508, spec["hidden_size"], spec["layers"], spec["intermediate_size"]))
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 30_937_600 and spec["vocab_size"] >= 508
    assert model.config.num_hidden_layers == 8 and model.config.hidden_size == 512
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # vLLM's CPU kernels accept it


def test_small_builds_at_reduced_size_and_learns(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.tiny import build_base_model

    info = build_base_model("small", tmp_path, warmup_steps=30, batch_size=8, hidden_size=128, layers=2,
                            intermediate_size=128, corpus_size=400, vocab_size=400, learning_rate=3e-3,
                            log=lambda *_: None)
    assert info["warmup_steps"] == 30 and info["warmup_loss_last"] < info["warmup_loss_first"] - 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 2 and model.device.type == "cpu"
    assert len(tokenizer) <= 400 and len(tokenizer.tokenize("1234")) == 4  # digits one by one
