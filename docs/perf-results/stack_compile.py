"""Prototype: the whole decoder stack as one compiled graph, each layer a nested compile region (compiled once).

    SHAPE=mistral-7b LAYERS=8 STEPS=10 SEQS=8 python docs/perf-results/stack_compile.py eager per_layer stacked

Perf-notes experiment 26: on torch 2.11 dynamo fails to trace it (InternalTorchDynamoError: KeyError
'example_value' in are_same_graph_modules); on the CPU the per-sequence attention fallback cannot be
inside a nested region at all (`.tolist()`).
"""
import contextlib, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
from app import bench
from app.training.loop import _decoder
from app.training.trainers import _fast, _collate, logprobs_from_logits, _packed_forward
from tests.training.conftest import lora

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cfg = bench.Config(shape=os.environ.get("SHAPE", "tiny"), num_layers=int(os.environ.get("LAYERS", 0)))
base = bench.build_model(cfg, dev)
model = lora(base, r=16, dropout=0.0)
if dev.type == "cuda":
    model.to(torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n: p.data = p.data.float()


@contextlib.contextmanager
def stacked(model):
    decoder = _decoder(model)
    layers = list(decoder.layers)
    cls = type(layers[0])
    saved_forward = cls.forward
    cls.forward = torch.compiler.nested_compile_region(saved_forward)

    def run_all(hidden_states, **kwargs):
        for layer in layers:
            hidden_states = layer(hidden_states, **kwargs)
        return hidden_states

    compiled = torch.compile(run_all, dynamic=True)
    object.__setattr__(decoder, "layers", [compiled])
    try:
        yield
    finally:
        del decoder.__dict__["layers"]
        cls.forward = saved_forward


@contextlib.contextmanager
def per_layer(model):
    layers = list(_decoder(model).layers)
    for l in layers: l.compile(dynamic=True)
    try: yield
    finally:
        for l in layers: l._compiled_call_impl = None


def make(size, seed):
    import random
    from app.training.packing import Sequence
    rng = random.Random(seed)
    L = int(os.environ.get("LEN", 250))
    out = []
    for _ in range(size):
        n = rng.randint(L // 2, 3 * L // 2); p = n // 2
        out.append(Sequence([rng.randrange(4, model.config.vocab_size) for _ in range(n)], [0] * p + [1] * (n - p)))
    return out


def step(seqs):
    b = _collate(seqs)
    b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
    t = b["shift_labels"][0].index_select(0, b["target_index"])
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        lp = logprobs_from_logits(_packed_forward(model, b), t)
    loss = -lp.mean()
    loss.backward()
    g = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])
    model.zero_grad()
    return loss.detach(), g


def run(name, ctx, n=int(os.environ.get("STEPS", 6)), size=int(os.environ.get("SEQS", 8))):
    out = []
    with _fast(model), ctx(model):
        t0 = time.perf_counter()
        for i in range(n):
            if i == 2:
                if dev.type == "cuda": torch.cuda.synchronize()
                t1 = time.perf_counter()
            out.append(step(make(size, i)))
        if dev.type == "cuda": torch.cuda.synchronize()
        t2 = time.perf_counter()
    print(f"{name}: first two steps {t1 - t0:.1f}s, then {(t2 - t1) / (n - 2) * 1e3:.1f} ms/step", flush=True)
    return out


variants = sys.argv[1:] or ["eager", "per_layer", "stacked"]
res = {}
for v in variants:
    res[v] = run(v, {"eager": lambda m: contextlib.nullcontext(), "per_layer": per_layer, "stacked": stacked}[v])
ref = res[variants[0]]
for v in variants[1:]:
    for i, ((l0, g0), (l1, g1)) in enumerate(zip(ref, res[v])):
        print(v, i, "loss", float(l0), float(l1), "grad rel diff", float((g0 - g1).norm() / g0.norm()))
