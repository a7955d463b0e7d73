import torch

from app.training.lora import fused_lora, lora_linears


def _outputs_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_same_function_and_gradients_as_peft(tiny):
    from tests.training.conftest import lora

    model = lora(tiny[0], r=4)
    ids = torch.randint(4, 512, (2, 9))
    plain_out, plain_grads = _outputs_and_grads(model, ids)
    with fused_lora(model) as n:
        assert n == len(lora_linears(model)) == 2 * 7
        fused_out, fused_grads = _outputs_and_grads(model, ids)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all("forward" not in layer.__dict__ for layer in lora_linears(model))  # restored
    model.unload()


def test_fused_lora_dropout_keeps_the_expectation(tiny):
    """With dropout, the fused layer scales kept inputs by 1/(1-p), like nn.Dropout: same mean output."""
    from tests.training.conftest import lora

    model = lora(tiny[0], r=4, dropout=0.5, b_std=0.5)
    layer = lora_linears(model)[0]
    x = torch.randn(256, layer.base_layer.in_features)
    layer.eval()
    expected = layer(x)
    layer.train()
    with fused_lora(model):
        torch.manual_seed(0)
        with torch.no_grad():
            draws = [layer(x) for _ in range(400)]
    assert not torch.equal(draws[0], draws[1])  # dropout is on
    samples = torch.stack(draws).mean(0)
    assert (samples - expected).abs().mean() < 0.1 * (expected - layer.base_layer(x)).abs().mean()
    model.unload()
