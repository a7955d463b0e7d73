"""Attention over packed rows: each token sees only the earlier tokens of its own sequence.

We register one attention implementation, `packed_varlen`, with transformers' attention
interface and switch a model to it only while it trains on packed rows (`packed_attention`).
The model's forward is called with `packed_cu_seqlens` / `packed_max_seqlen` keyword arguments,
which transformers passes down, untouched, to every attention call.

On CUDA this is flash-attention's varlen kernel, shipped inside PyTorch
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10): no padding, no mask tensor, no
wasted blocks. Elsewhere (CPU tests, older torch) it is one causal SDPA call per sequence:
slower, the same function. A segment's keys may be other rows than its queries
(`packed_kv_index`, `packed_cu_seqlens_k`): DPO's rejected completion attends to the prompt
that its chosen twin already computed (`packing.pack_pairs`). A call without the packed keywords (generation,
evaluation) goes to plain SDPA, so a model left in this mode still works.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

from app.training.overrides import attention_implementation, packed_row_detection_off

NAME = "packed_varlen"
_registered = False


def _varlen_kernel():
    """torch's varlen flash attention and the keyword that makes it causal, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.11
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in params:  # torch 2.10
        return varlen_attn, {"is_causal": True}
    return None


_VARLEN = _varlen_kernel()


def varlen_attention(query, key, value, cu_seqlens, max_seqlen: int, scale: float, cu_seqlens_k=None,
                     max_seqlen_k: int | None = None):
    """query (T, Hq, D), key/value (K, Hkv, D) -> (T, Hq, D), causal within each segment.

    Segment i's queries are rows cu_seqlens[i]:cu_seqlens[i+1] of `query`, its keys rows
    cu_seqlens_k[i]:cu_seqlens_k[i+1] of `key` (by default the same rows). With more keys than
    queries, the queries are the segment's last tokens (causal aligned at the bottom right, as
    flash-attention does): query j sees keys 0 .. j + (keys - queries).
    """
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    if query.is_cuda and _VARLEN is not None:
        kernel, causal = _VARLEN
        if key.shape[1] != query.shape[1]:
            # Flash-attention handles grouped KV heads natively, but not every torch release's
            # wrapper accepts them; repeating K/V costs ~2% of a layer's memory traffic.
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return kernel(query, key, value, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, scale=scale, **causal)
    # One causal SDPA call per segment: sum(L_i^2) work, not T^2.
    bounds, key_bounds = cu_seqlens.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s, e, ks, ke in zip(bounds[:-1], bounds[1:], key_bounds[:-1], key_bounds[1:]):
        q, k, v = query[s:e].transpose(0, 1), key[ks:ke].transpose(0, 1), value[ks:ke].transpose(0, 1)
        if e - s == ke - ks:
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True))
        else:
            offset = (ke - ks) - (e - s)
            mask = torch.arange(ke - ks)[None, :] <= torch.arange(e - s)[:, None] + offset
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device), scale=scale,
                                                       enable_gqa=True))
    return torch.cat([o.transpose(0, 1) for o in outs])


def _attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       sliding_window=None, **kwargs):
    """transformers' attention-interface signature; query is (B, H, T, D), the result (B, T, H, D)."""
    cu_seqlens = kwargs.get("packed_cu_seqlens")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row (batch size 1)")
    max_seqlen = int(kwargs["packed_max_seqlen"])
    if sliding_window is not None and max_seqlen > sliding_window:
        raise ValueError(f"packed sequences of {max_seqlen} tokens exceed the model's sliding window "
                         f"({sliding_window}); not supported by the packed path")
    if dropout:
        raise ValueError("attention dropout is not supported by the packed path")
    key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)
    kv_index = kwargs.get("packed_kv_index")
    if kv_index is not None:
        # Segments whose keys are not their own rows (a DPO prompt shared by both completions):
        # the keys of every segment, gathered in segment order.
        key, value = key.index_select(0, kv_index), value.index_select(0, kv_index)
    out = varlen_attention(query[0].transpose(0, 1), key, value, cu_seqlens, max_seqlen,
                           scaling if scaling is not None else query.shape[-1] ** -0.5,
                           kwargs.get("packed_cu_seqlens_k"), kwargs.get("packed_max_seqlen_k"))
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    # The boundaries travel as cu_seqlens; a (T, T) mask would cost memory and time for nothing.
    return None


def register() -> str:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, _attention_forward)
        AttentionMaskInterface.register(NAME, _no_mask)
        _registered = True
    return NAME


@contextlib.contextmanager
def packed_attention(model):
    """Inside this block the model's attention layers run `packed_varlen`; restored after."""
    with attention_implementation(model, register()), packed_row_detection_off():
        yield model


def uses_flash_varlen(device: torch.device | str) -> bool:
    """Whether packed attention on `device` runs the flash varlen kernel (else the masked SDPA fallback)."""
    return torch.device(device).type == "cuda" and _VARLEN is not None
