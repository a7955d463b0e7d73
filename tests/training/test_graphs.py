"""StepGraphs: a step captured once per key and replayed must compute what the eager step computes.

On the CPU nothing is captured: "replaying" runs the step again on the recorded input buffers,
so these tests check the bookkeeping the CUDA path shares (input buffers, outputs copied out,
gradients through shared buffers, failure handling). The tests marked `cuda` capture for real
and replay against the eager step; they run where a CUDA device is present.
"""

import pytest
import torch

from app.training.graphs import StepGraphs


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _loss_fn(model):
    def fn(batch):
        out = model(batch["x"]).squeeze(-1)
        loss = ((out - batch["y"]) ** 2).mean() * batch["scale"]
        return loss, out
    return fn


def _batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 6, generator=g), "y": torch.randn(n, generator=g), "scale": 2.0}


def _eager(model, batch):
    model.zero_grad(set_to_none=True)
    loss, out = _loss_fn(model)(batch)
    loss.backward()
    return loss.detach(), out.detach(), [p.grad.clone() for p in model.parameters()]


def test_replay_computes_the_eager_step_on_new_inputs():
    model = _model()
    graphs = StepGraphs(list(model.parameters()), capture=False)
    fn = _loss_fn(model)
    results = []
    for seed in range(4):
        batch = _batch(seed)
        expected_loss, expected_out, expected_grads = _eager(model, batch)
        model.zero_grad(set_to_none=True)
        loss, out = graphs.step(("shape", 4), batch, fn)
        assert torch.allclose(loss, expected_loss) and torch.allclose(out, expected_out)
        for p, g in zip(model.parameters(), expected_grads):
            assert torch.allclose(p.grad, g, atol=1e-7)
        results.append(out)
        with torch.no_grad():  # an optimizer step between steps: the replays see the new weights
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert (graphs.stats.eager, graphs.stats.captured, graphs.stats.replayed) == (1, 1, 3)
    # From the first replay on, gradients come through the one shared set of buffers.
    assert all(p.grad is g for p, g in zip(model.parameters(), graphs.grads))
    # Outputs are copies: a later replay does not change what an earlier step returned.
    assert not torch.equal(results[1], results[2])


def test_steps_without_a_key_or_past_the_limit_run_eagerly():
    model = _model()
    graphs = StepGraphs(list(model.parameters()), capture=False, max_graphs=1)
    fn = _loss_fn(model)
    graphs.step(None, _batch(0), fn)
    graphs.step(("a",), _batch(1), fn)
    graphs.step(("b",), _batch(2, n=3), fn)  # a second shape: over max_graphs
    loss, _ = graphs.step(("b",), _batch(3, n=3), fn)
    assert (graphs.stats.eager, graphs.stats.captured, graphs.stats.replayed) == (4, 1, 0)
    assert list(graphs.recorded) == [("a",)]
    assert torch.allclose(loss, _eager(model, _batch(3, n=3))[0])


def test_a_failed_capture_keeps_the_steps_result_and_turns_graphs_off():
    model = _model()
    messages = []
    graphs = StepGraphs(list(model.parameters()), capture=False, log=messages.append)
    fn = _loss_fn(model)
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the recording run
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn(batch)

    _, _, expected_grads = _eager(model, _batch(0))
    model.zero_grad(set_to_none=True)
    graphs.step(("a",), _batch(0), flaky)
    for p, g in zip(model.parameters(), expected_grads):  # the eager run's gradients, not the failed capture's
        assert torch.allclose(p.grad, g)
    assert "not permitted" in graphs.stats.failure and "capture failed" in messages[0]
    graphs.step(("a",), _batch(1), flaky)
    assert (graphs.stats.eager, graphs.stats.captured, graphs.stats.replayed) == (2, 0, 0)


def test_step_graphs_need_parameters():
    with pytest.raises(ValueError, match="trainable"):
        StepGraphs([], capture=False)


def test_capture_refuses_parameters_off_the_gpu():
    """A CUDA graph of CPU work records nothing: its replays would silently repeat the first step's result."""
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(list(_model().parameters()), capture=True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_captured_replays_compute_the_eager_step_on_cuda():
    model = _model().cuda()
    graphs = StepGraphs(list(model.parameters()), capture=True)
    fn = _loss_fn(model)
    for seed in range(5):  # two shapes, replayed out of order, the weights changing in between
        n = 4 if seed % 2 == 0 else 8
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _batch(seed, n).items()}
        expected_loss, _, expected_grads = _eager(model, batch)
        model.zero_grad(set_to_none=True)
        loss, _ = graphs.step(("shape", n), batch, fn)
        torch.testing.assert_close(loss, expected_loss)
        for p, g in zip(model.parameters(), expected_grads):
            torch.testing.assert_close(p.grad, g)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert (graphs.stats.captured, graphs.stats.replayed, graphs.stats.failure) == (2, 3, None)


@cuda
def test_random_numbers_on_the_gpu_still_work_after_a_failed_capture():
    model = _model().cuda()
    graphs = StepGraphs(list(model.parameters()), capture=True)
    fn = _loss_fn(model)

    def syncs(batch):
        loss, out = fn(batch)
        float(loss)  # a host read: not allowed while capturing
        return loss, out

    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _batch(0).items()}
    graphs.step(("a",), batch, syncs)
    assert graphs.stats.failure is not None and graphs.stats.captured == 0
    assert torch.randn(3, device="cuda").isfinite().all()
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), 0.5)
