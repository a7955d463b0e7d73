"""The losses of the training path, computed without a (tokens x vocab) fp32 tensor.

* `logprobs_from_logits`: log p(target) per position, from bf16 (or fp32) logits, with the
  log-softmax in fp32 row chunks and its backward written straight into the logits' dtype;
  the trainers run the LM head only on the positions that carry a loss (`logits_to_keep`).
* `dpo_sigmoid_loss`: TRL's default DPO loss, per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 4096


class _LogProbsFromLogits(torch.autograd.Function):
    """log_softmax(logits.float()) gathered at `targets`, in row chunks; backward written in logits' dtype."""

    @staticmethod
    def forward(ctx, logits, targets, chunk: int):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], chunk):
            z = logits[s:s + chunk].float()
            lse[s:s + chunk] = z.logsumexp(-1)
            out[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            # d logp_y / d z = onehot(y) - softmax(z)
            p = (logits[s:s + ctx.chunk].float() - lse[s:s + ctx.chunk, None]).exp_()
            p.scatter_add_(1, targets[s:s + ctx.chunk, None], torch.full_like(p[:, :1], -1.0))
            grad[s:s + ctx.chunk] = p.mul_(-grad_out[s:s + ctx.chunk, None])
        return grad, None, None


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(M, V) logits (any float dtype), (M,) targets -> (M,) fp32 log-probs, never holding (M, V) in fp32."""
    return _LogProbsFromLogits.apply(logits, targets, chunk)


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss (Rafailov et al.), TRL's default `sigmoid` loss: -log sigmoid(beta * margin)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)
