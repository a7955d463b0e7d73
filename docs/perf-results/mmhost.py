"""Host cost per launch on the device's CPU: cuBLAS GEMMs (fixed and changing M, cublas vs cublaslt) and a plain elementwise kernel.

    python docs/perf-results/mmhost.py     # what produced h100-s4-launch-cost.log
"""
import time
import torch

dev = "cuda"
bf = torch.bfloat16
K, R = 4096, 16
W = torch.randn(1024, K, device=dev, dtype=bf)
A = torch.randn(R, K, device=dev, dtype=bf)
xs = {m: torch.randn(m, K, device=dev, dtype=bf) for m in range(128, 128 + 64)}
x = xs[128]


def bench(name, fn, n=3000):
    for _ in range(50):
        fn(0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / n * 1e6
    print(f"{name:55s} host {host:6.1f} us/call  wall {total:6.1f} us/call", flush=True)


for lib in ("cublas", "cublaslt"):
    torch.backends.cuda.preferred_blas_library(lib)
    print("preferred", torch.backends.cuda.preferred_blas_library())
    bench(f"{lib}: mm x(128,K) @ A.T (R=16) fixed", lambda i: torch.mm(x, A.t()))
    bench(f"{lib}: mm x(128,K) @ W.T (1024) fixed", lambda i: torch.mm(x, W.t()))
    bench(f"{lib}: mm x(M,K) @ W.T, M cycles over 64 values", lambda i: torch.mm(xs[128 + i % 64], W.t()))
    bench(f"{lib}: mm x(M,K) @ A.T, M new every call (after warm)", lambda i: torch.mm(xs[128 + i % 64], A.t()))
    out = torch.empty(128, 1024, device=dev, dtype=bf)
    bench(f"{lib}: mm out= fixed", lambda i: torch.mm(x, W.t(), out=out))
    bench(f"{lib}: addmm_ fixed", lambda i: out.addmm_(x[:, :R], A[:, :1024].t()) if False else out.addmm_(x[:, :16], A[:, :1024]))
y = torch.randn(128, 1024, device=dev, dtype=bf)
bench("elementwise add_", lambda i: y.add_(1.0))
for m in (512, 2048, 4096):
    xm = torch.randn(m, K, device=dev, dtype=bf)
    Wq = torch.randn(4096, K, device=dev, dtype=bf)
    bench(f"mm x({m},K) @ Wq.T (4096x4096) GPU-bound", lambda i: torch.mm(xm, Wq.t()), n=300)
