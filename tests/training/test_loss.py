import math

import torch
import torch.nn.functional as F

from app.training.loss import dpo_sigmoid_loss, logprobs_from_logits


def test_logprobs_from_logits_matches_cross_entropy_in_bf16():
    torch.manual_seed(0)
    logits = (3 * torch.randn(21, 64)).bfloat16().requires_grad_()
    targets = torch.randint(0, 64, (21,))
    ours = logprobs_from_logits(logits, targets, chunk=5)
    (-ours.mean()).backward()
    grad_ours = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits.float(), targets, reduction="none")
    ref.mean().backward()
    torch.testing.assert_close(-ours, ref, rtol=1e-6, atol=1e-6)
    assert grad_ours.dtype == torch.bfloat16
    torch.testing.assert_close(grad_ours, logits.grad, rtol=1e-2, atol=1e-4)


def test_dpo_sigmoid_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-12.0, -30.5])
    loss = dpo_sigmoid_loss(logps, logps + 1, logps, logps + 1, beta=0.1)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    # chosen up by 1 nat relative to the reference, rejected unchanged: -log sigmoid(0.1)
    moved = dpo_sigmoid_loss(logps + 1, logps, logps, logps, beta=0.1)
    torch.testing.assert_close(moved, torch.full((2,), -math.log(1 / (1 + math.exp(-0.1)))))
