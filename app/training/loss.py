"""Losses computed from the last hidden states, never from full fp32 logits.

The plain path runs the LM head over every position, keeps a (tokens x 32000) logits tensor,
upcasts it to fp32 and takes a cross-entropy: 0.5 GB per 4k tokens, more in backward, and most
of those rows (prompt tokens, padding) carry no loss at all. Here:

* only positions that have a target go through the LM head;
* they go in chunks, so at most one chunk's fp32 logits exist at a time;
* with a frozen LM head (LoRA) the backward needs only d logp / d hidden, which for a chunk is
  `W[y] - softmax(z) @ W`: computed in the forward, kept in bf16 (the size of the hidden
  states), and scaled by the incoming per-token gradient in the backward. No recomputation.

`token_logprobs` returns log p(target) per selected position, in fp32, the same numbers as
`log_softmax(lm_head(h).float())` gathered at the targets (the logits are the same bf16 matmul,
upcast the same way). The SFT loss and the DPO loss are both built on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.training.packing import IGNORE

DEFAULT_CHUNK = 4096


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, with_grad: bool):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_dir = torch.empty_like(hidden) if with_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            y = targets[start:start + chunk]
            logits = (h @ weight.t()).float()
            logp = logits.log_softmax(-1)
            out[start:start + chunk] = logp.gather(1, y[:, None]).squeeze(1)
            if with_grad:
                # d logp_y / d logits = onehot(y) - softmax; times W gives d logp_y / d h.
                probs = logp.exp_()
                probs.scatter_add_(1, y[:, None], torch.full_like(y[:, None], -1, dtype=probs.dtype))
                grad_dir[start:start + chunk] = -(probs.to(weight.dtype) @ weight)
        ctx.save_for_backward(grad_dir)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_dir,) = ctx.saved_tensors
        return grad_dir * grad_out[:, None].to(grad_dir.dtype), None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for rows of `hidden` (N, d), with LM-head `weight` (V, d); (N,) fp32."""
    if weight.requires_grad:
        # A trainable head needs d/dW too: fall back to autograd through the chunks.
        return torch.cat([(hidden[s:s + chunk] @ weight.t()).float().log_softmax(-1)
                          .gather(1, targets[s:s + chunk, None]).squeeze(1)
                          for s in range(0, hidden.shape[0], chunk)])
    return _ChunkedLogProbs.apply(hidden, weight, targets, chunk, hidden.requires_grad)


def selected_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      index: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the positions whose target is not IGNORE: (logps (M,), their indices (M,)).

    `hidden` is (T, d) for one packed row; `targets` (T,). Pass `index` (the packed batch's
    `target_index`) to skip finding it on the device, which would make the host wait.
    """
    if index is None:
        index = (targets != IGNORE).nonzero().squeeze(1)
    return token_logprobs(hidden.index_select(0, index), weight, targets.index_select(0, index), chunk), index


def sequence_logprobs(hidden, weight, targets, seq_index, num_sequences: int, index: torch.Tensor | None = None,
                      chunk: int = DEFAULT_CHUNK):
    """Sum of the target log-probs of each packed sequence: (num_sequences,) fp32."""
    logps, index = selected_logprobs(hidden, weight, targets, index, chunk)
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=hidden.device)
    return sums.index_add(0, seq_index.index_select(0, index), logps)


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss (Rafailov et al.), TRL's default `sigmoid` loss: -log sigmoid(beta * margin)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def reference_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The unoptimised SFT loss: full logits, fp32 cross-entropy, mean over target tokens.

    This is what TRL's path computes on a padded batch; kept here as the yardstick the fast path
    is tested against, and used by the bench to show both give the same number.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    n = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum") / max(n, 1)
    return loss, n
