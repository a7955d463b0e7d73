"""A training step's forward and backward replayed as one CUDA graph: the host launches it once.

    graphs = StepGraphs(trainable_params, capture=torch.cuda.is_available())
    loss, *outputs = graphs.step(key, inputs, loss_fn)   # gradients land in each param's .grad

Why: a DPO step of the reference case (4 pairs, ~2,000 tokens) is ~6,800 kernel launches
(reference forward, policy forward, backward over 32 decoder layers), and on the H100 hosts the
Python and launch cost of those (~270 ms) exceeds the GPU's work (~170 ms): the GPU waits for
the host. Replaying a captured graph costs the host one call, so the step takes the GPU's time.

How: `loss_fn(inputs)` returns `(loss, *outputs)`; the step is its forward plus `loss.backward()`.
Graphs need fixed shapes and addresses, so:

* the caller pads its batches to a few shapes and passes a `key` naming the shape (the fast
  DPO collator pads each packed row to a multiple of 128 tokens with a filler sequence whose
  log-probs nothing reads: ~16 shapes cover a GSM8K run, ~3% more tokens);
* the first step of each key runs eagerly (it is also the warm-up: compilation, autotuning,
  library handles), then the step is captured once; later steps of that key copy their inputs
  into the captured input buffers and replay;
* every graph writes its gradients into one shared set of buffers (zeroed inside the graph,
  then accumulated into by autograd, which keeps the tensor), and after a replay each param's
  `.grad` is pointed at its buffer: the optimizer, clipping and `zero_grad(set_to_none=True)`
  work as usual. The outputs are copied out of the graph (the next replay overwrites them);
* graphs share one memory pool: a step's activations live there, whichever key it has.

Not captured: anything between steps (the optimizer, clipping, logging, the gradient
all-reduce of several ranks, which the caller does after `step`). If a capture fails, `step`
says why once and runs every later step eagerly. DDP must not hold the parameters: it keeps
their gradient-accumulation nodes, made on the default stream, and a capture on another stream
then fails (the fast DPO trainer runs its graph path without DDP and all-reduces itself).

With `capture=False` (the CPU, tests) the same bookkeeping runs and "replaying" calls `loss_fn`
again on the copied inputs: the inputs, outputs and gradients go through the same buffers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

LossFn = Callable[[dict], tuple]


@dataclass
class GraphStats:
    captured: int = 0
    replayed: int = 0
    eager: int = 0
    capture_seconds: float = 0.0
    failure: str | None = None

    def as_dict(self) -> dict:
        return {"graphs_captured": self.captured, "graph_replays": self.replayed, "eager_steps": self.eager,
                "capture_seconds": round(self.capture_seconds, 2), "graph_failure": self.failure}


def _detached(values) -> tuple:
    return tuple(v.detach() for v in values)


def _reset_capture_state() -> None:
    """After a failed capture, one empty capture: it puts the CUDA generator back out of its capture state.

    Otherwise every later random op on the device (dropout, `torch.randn`, sampling) raises
    "Offset increment outside graph capture encountered unexpectedly" (seen with torch 2.11).
    """
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin()
    graph.capture_end()


class _Recorded:
    """One key's captured step: its input buffers, its outputs, and how to run it again."""

    def __init__(self, inputs: dict, outputs: tuple, replay: Callable[[], None]):
        self.inputs, self.outputs, self.replay = inputs, outputs, replay


class StepGraphs:
    def __init__(self, params, capture: bool, max_graphs: int = 32, log: Callable[[str], None] | None = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("StepGraphs needs the trainable parameters")
        if capture and not all(p.is_cuda for p in self.params):
            # A CUDA graph of CPU work captures nothing, and its replays would do nothing.
            raise ValueError("StepGraphs(capture=True) needs parameters on a CUDA device")
        self.capture = capture
        self.max_graphs = max_graphs
        self.log = log or (lambda message: None)
        self.grads: list[torch.Tensor] | None = None  # shared by every graph
        self.recorded: dict = {}
        self.pool = None
        self.stats = GraphStats()

    def step(self, key, inputs: dict, loss_fn: LossFn) -> tuple:
        """Forward + backward of `loss_fn(inputs)`; returns `(loss, *outputs)` detached, gradients in `.grad`.

        `key` must determine the shape of every tensor in `inputs` and every non-tensor value
        `loss_fn` reads; None means "do not capture this step".
        """
        recorded = self.recorded.get(key) if key is not None else None
        if recorded is not None:
            return self._replay(recorded, inputs)
        out = self._eager(inputs, loss_fn)
        if key is not None and self.stats.failure is None and len(self.recorded) < self.max_graphs:
            self._record(key, inputs, loss_fn)
        return out

    # -----------------------------------------------------------------------------------------

    def _eager(self, inputs: dict, loss_fn: LossFn) -> tuple:
        self.stats.eager += 1
        loss, *outputs = loss_fn(inputs)
        loss.backward()
        return _detached((loss, *outputs))

    def _shared_grads(self) -> list[torch.Tensor]:
        if self.grads is None:
            self.grads = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        return self.grads

    def _forward_backward_into_buffers(self, buffers: dict, loss_fn: LossFn) -> tuple:
        grads = self._shared_grads()
        torch._foreach_zero_(grads)
        for param, grad in zip(self.params, grads):
            param.grad = grad
        loss, *outputs = loss_fn(buffers)
        loss.backward()
        return _detached((loss, *outputs))

    def _record(self, key, inputs: dict, loss_fn: LossFn) -> None:
        """Capture `key`'s step (after its eager run, whose gradients stay this step's result)."""
        this_step = [p.grad for p in self.params]
        buffers = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        started = time.perf_counter()
        try:
            if self.capture:
                recorded = self._capture(buffers, loss_fn)
            else:
                outputs = self._forward_backward_into_buffers(buffers, loss_fn)
                outputs = tuple(o.clone() for o in outputs)

                def replay():
                    for out, new in zip(outputs, self._forward_backward_into_buffers(buffers, loss_fn)):
                        out.copy_(new)

                recorded = _Recorded(buffers, outputs, replay)
            moved = [i for i, (p, g) in enumerate(zip(self.params, self.grads)) if p.grad is not g]
            if moved:
                raise RuntimeError(f"autograd replaced {len(moved)} gradient buffers instead of accumulating into them")
        except Exception as exc:  # a step that cannot be captured still trains, eagerly
            self.stats.failure = f"{type(exc).__name__}: {exc}"[:500]
            self.log(f"cuda graphs: capture failed, every step runs eagerly from now on ({self.stats.failure})")
            if self.capture:
                torch.cuda.synchronize()
                _reset_capture_state()
        else:
            self.recorded[key] = recorded
            self.stats.captured += 1
        finally:
            self.stats.capture_seconds += time.perf_counter() - started
            for param, grad in zip(self.params, this_step):
                param.grad = grad

    def _capture(self, buffers: dict, loss_fn: LossFn) -> _Recorded:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may allocate pinned memory meanwhile, which
        # is harmless to this capture but would abort it in the default (global) mode.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self._forward_backward_into_buffers(buffers, loss_fn)
        if self.pool is None:
            self.pool = graph.pool()
        return _Recorded(buffers, outputs, graph.replay)

    def _replay(self, recorded: _Recorded, inputs: dict) -> tuple:
        for name, value in inputs.items():
            if torch.is_tensor(value):
                recorded.inputs[name].copy_(value, non_blocking=True)
        recorded.replay()
        for param, grad in zip(self.params, self.grads):
            param.grad = grad
        self.stats.replayed += 1
        return tuple(o.clone() for o in recorded.outputs)
