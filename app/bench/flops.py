"""FLOPs per token and MFU, counted the usual way (model FLOPs; recomputation is not counted).

LoRA training with a frozen base: the forward costs 2 FLOPs per matmul weight per token, the
backward another 2 (gradients with respect to the activations only: the frozen weights need
none), the adapters 6 per adapter weight. Causal attention adds 4*h FLOPs per layer per earlier
position in the forward (scores and weighted sum), twice that in the backward. Embedding lookups
are free. MFU divides achieved FLOPs by the chip's dense bf16 peak.
"""

from __future__ import annotations

# Dense bf16 peak by the vendor's datasheet (SXM parts); H200 has the H100's arithmetic.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def matmul_params(config) -> int:
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return layers * per_layer + config.vocab_size * h  # + the LM head


def attention_flops_forward(config, seq_len: float) -> float:
    """Forward attention FLOPs per token, averaged over a causal sequence of `seq_len` tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    return config.num_hidden_layers * 4 * width * seq_len / 2


def lora_train_flops_per_token(config, seq_len: float, lora_params: int) -> float:
    return 4 * matmul_params(config) + 3 * attention_flops_forward(config, seq_len) + 6 * lora_params


def forward_flops_per_token(config, seq_len: float) -> float:
    return 2 * matmul_params(config) + attention_flops_forward(config, seq_len)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(flops_per_second: float, device_name: str) -> float | None:
    peak = peak_tflops(device_name)
    return None if peak is None else flops_per_second / (peak * 1e12)
