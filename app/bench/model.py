"""The bench's model, tokenizer and data: a random-weight model of a given shape, a word-level
tokenizer (one word = one token, so lengths are exact) and texts of GSM8K's lengths."""

from __future__ import annotations

import random

from app.bench.config import SHAPES, Config

# 128 (question, answer) character lengths drawn at random (seed 0) from GSM8K's train split.
# Lengths only; the text is not needed to time anything.
GSM8K_CHAR_LENGTHS = [
    (227, 235), (427, 460), (408, 268), (363, 250), (541, 530), (525, 410), (432, 342), (279, 154), (247, 285),
    (239, 225), (458, 481), (182, 191), (298, 249), (356, 376), (183, 280), (199, 460), (472, 614), (145, 257),
    (280, 207), (203, 756), (146, 325), (308, 348), (232, 203), (169, 125), (149, 171), (362, 354), (214, 263),
    (203, 285), (370, 424), (231, 207), (310, 242), (139, 277), (235, 300), (88, 302), (148, 104), (180, 256),
    (142, 205), (298, 209), (366, 381), (208, 307), (127, 230), (202, 180), (121, 177), (249, 262), (88, 181),
    (256, 392), (463, 494), (250, 247), (451, 352), (193, 154), (240, 285), (121, 262), (262, 235), (169, 286),
    (380, 367), (104, 185), (201, 350), (164, 306), (161, 166), (154, 137), (397, 553), (223, 126), (255, 238),
    (184, 148), (255, 190), (302, 121), (211, 167), (326, 612), (240, 203), (322, 513), (245, 215), (232, 832),
    (262, 163), (190, 270), (214, 296), (562, 298), (225, 256), (128, 138), (156, 229), (116, 119), (229, 107),
    (306, 326), (398, 705), (260, 229), (111, 205), (153, 398), (123, 220), (194, 250), (102, 137), (155, 147),
    (436, 466), (237, 327), (168, 121), (285, 457), (305, 329), (249, 65), (160, 334), (264, 181), (353, 363),
    (199, 194), (302, 303), (180, 287), (220, 284), (85, 205), (210, 99), (237, 373), (374, 268), (147, 214),
    (282, 292), (198, 275), (295, 217), (248, 265), (178, 161), (448, 544), (115, 268), (143, 104), (333, 309),
    (175, 321), (352, 244), (414, 510), (254, 711), (211, 298), (243, 228), (309, 649), (179, 229), (194, 213),
    (374, 307), (249, 244),
]
# Token lengths as measured on GSM8K with the Abel prompt and Mistral's tokenizer:
# prompt ~110 = ~40 tokens of instruction and template + the question; completion ~130; rejected ~150.
PROMPT_FIXED, PROMPT_PER_CHAR, COMPLETION_PER_CHAR, REJECTED_FACTOR = 40, 70 / 234.5, 130 / 287.5, 150 / 130


def model_config(config: Config):
    from transformers import MistralConfig

    hidden, layers, heads, kv_heads, mlp, vocab = SHAPES[config.shape]
    hidden = config.hidden_size or hidden
    return MistralConfig(hidden_size=hidden, num_hidden_layers=config.num_layers or layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=mlp if not config.hidden_size else int(hidden * 3.5),
                         head_dim=config.head_dim or hidden // heads,
                         vocab_size=config.vocab_size or vocab, max_position_embeddings=4096, sliding_window=None,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
                         attn_implementation="sdpa")


def build_model(config: Config, device):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(config), dtype=dtype)
    model.config.use_cache = False
    return model


def word_tokenizer(vocab_size: int):
    """One whitespace-separated word `w<id>` = one token `<id>`: exact, controllable lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def token_lengths(config: Config, n: int) -> list[tuple[int, int, int]]:
    """(prompt, completion, rejected) token lengths of `n` GSM8K-like examples."""
    chars = GSM8K_CHAR_LENGTHS
    if config.lengths:
        from app.data import read_jsonl

        chars = [(len(row["question"]), len(row["answer"])) for _, row in read_jsonl(config.lengths)]
    rng = random.Random(config.seed)
    out = []
    for _ in range(n):
        q, a = rng.choice(chars)
        completion = max(4, round(a * COMPLETION_PER_CHAR))
        rejected = max(4, round(completion * REJECTED_FACTOR * rng.uniform(0.8, 1.2)))
        out.append((PROMPT_FIXED + round(q * PROMPT_PER_CHAR), completion, rejected))
    return out


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))


def texts(config: Config, vocab: int) -> list[dict]:
    """Prompt / completion / rejected texts; the prompt's BOS and the completions' EOS count in the lengths."""
    rng = random.Random(config.seed + 1)
    rows = []
    for prompt, completion, rejected in token_lengths(config, config.examples):
        rows.append({"prompt": _words(rng, prompt - 1, vocab),
                     "completion": " " + _words(rng, completion - 1, vocab),
                     "rejected": " " + _words(rng, rejected - 1, vocab)})
    return rows


def lora_model(base, config: Config, dropout: float):
    from peft import get_peft_model

    from app.models import lora_config

    return get_peft_model(base, lora_config(config.lora_r, config.lora_alpha, dropout))


def lora_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def restore_base(peft_model):
    """The base model back, without adapters, hooks or checkpointing, for the next run."""
    base = peft_model.unload() if hasattr(peft_model, "unload") else peft_model
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    if hasattr(base, "disable_input_require_grads"):
        try:
            base.disable_input_require_grads()
        except AttributeError:
            pass
    for p in base.parameters():
        p.requires_grad_(False)
        p.grad = None
    base.config.use_cache = False
    return base
