"""A fused LoRA linear layer for training: the same function as PEFT's, fewer passes over memory.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` with its adapter weights kept in
fp32, so under bf16 training each of the 7 adapted projections of each layer casts its input to
fp32, runs the two small matmuls, casts back and adds: about six extra passes over an
activation-sized tensor per projection, and an fp32 copy of every input kept for backward.

`fused_lora(model)` swaps the forward of every PEFT LoRA `Linear` for one autograd function that
computes the same thing with bf16 matmuls (the adapter's fp32 weights are cast once per call,
as autocast would), adds the low-rank term into the base output in place (`addmm_`), and saves
only its input (the same tensor the frozen base matmul saves), the (N, r) projection and, with
dropout, a bool mask. Adapter gradients come back in fp32, so the optimizer still updates fp32
master weights: what is learned is unchanged; `tests/training/test_lora.py` checks outputs and
gradients against PEFT's own forward.

Layers this does not cover (merged or disabled adapters, several active adapters, LoRA
variants such as DoRA, a trainable base weight) keep PEFT's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.training.overrides import replaced_forwards


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float):
        dtype = x.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        mask = None
        if dropout_p > 0.0:
            mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            xa = (x2 * mask * (1.0 / (1.0 - dropout_p))) @ a.t()
        else:
            xa = x2 @ a.t()
        out = F.linear(x2, weight, bias)
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, xa, mask)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.x_shape, ctx.adapter_dtypes = x.shape, (lora_a.dtype, lora_b.dtype)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, a, b, xa, mask = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        scale, p = ctx.scaling, ctx.dropout_p
        g_xa = (g @ b).mul_(scale)  # (N, r)
        grad_b = (g.t() @ xa).mul_(scale).to(ctx.adapter_dtypes[1])
        xd = x2 if mask is None else x2 * mask * (1.0 / (1.0 - p))
        grad_a = (g_xa.t() @ xd).to(ctx.adapter_dtypes[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(g_xa, a)
            else:
                grad_x.add_((g_xa @ a) * mask, alpha=1.0 / (1.0 - p))
            grad_x = grad_x.view(ctx.x_shape)
        grad_bias = g.sum(0) if (ctx.has_bias and ctx.needs_input_grad[2]) else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _fused_forward(self, x, *args, **kwargs):
    if not _fusable(self) or args or kwargs:
        return self._unfused_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    dropout = self.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0)) if self.training else 0.0
    base = self.base_layer
    weight, bias = base.weight, base.bias
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Do what autocast would do to the three matmuls (run them in its dtype), then keep it out.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _LoRALinear.apply(x, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                     float(self.scaling[name]), p)
    return _LoRALinear.apply(x, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             float(self.scaling[name]), p)


def _fusable(layer) -> bool:
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    base = layer.base_layer
    return isinstance(base, torch.nn.Linear) and not base.weight.requires_grad


def lora_linears(model):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def fused_lora(model):
    """Inside this block every PEFT LoRA Linear of `model` runs the fused forward; restored after."""
    return replaced_forwards(lora_linears(model), _fused_forward)
