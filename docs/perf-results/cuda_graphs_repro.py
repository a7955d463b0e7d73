"""CUDA graphs (torch.compile "reduce-overhead") on our compiled decoder layers, fixed row shapes.

    python docs/perf-results/cuda_graphs_repro.py 0 0.05   # static shapes, LoRA dropout 0.05 (from the repo root)
    python docs/perf-results/cuda_graphs_repro.py 1 0.05   # dynamic shapes, as the phases compile today

Two layers of the Mistral-7B shape, 8 x 256-token packed rows, forward + backward 6 times
(perf-notes experiment 19; output in h200-s2-cuda-graphs.log).
"""
import faulthandler
import sys
import time

faulthandler.enable()
import torch  # noqa: E402

sys.path.insert(0, ".")
from app import bench  # noqa: E402
from app.training.packing import Sequence, pack  # noqa: E402
from app.training.trainers import _fast, _packed_forward, logprobs_from_logits  # noqa: E402

dynamic, dropout = bool(int(sys.argv[1])), float(sys.argv[2])
device = torch.device("cuda")
cfg = bench.Config(shape="mistral-7b", num_layers=2, seed=0)
base = bench.build_model(cfg, device)
model = bench.lora_model(base, cfg, dropout)
model.train()
seqs = [Sequence(list(range(4, 260)), [0] * 100 + [1] * 156) for _ in range(8)]
batch = pack(seqs).to(device)
inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "packed_cu_seqlens": batch.cu_seqlens,
          "packed_max_seqlen": batch.max_seqlen, "target_index": batch.target_index}
targets = batch.targets.index_select(0, batch.target_index)
layers = list(model.get_base_model().model.layers)
with _fast(model):
    for layer in layers:
        layer.compile(dynamic=dynamic, mode="reduce-overhead")
    for step in range(6):
        t = time.time()
        torch.compiler.cudagraph_mark_step_begin()
        logps = logprobs_from_logits(_packed_forward(model, inputs), targets)
        loss = -logps.mean()
        print(f"step {step} forward ok loss {loss.item():.4f}", flush=True)
        loss.backward()
        torch.cuda.synchronize()
        print(f"step {step} backward ok {time.time() - t:.2f}s", flush=True)
        model.zero_grad(set_to_none=True)
print("DONE", flush=True)
