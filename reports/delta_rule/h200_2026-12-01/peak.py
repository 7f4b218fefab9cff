"""Extra peak memory (MB above the inputs) of chunk_delta_rule's forward and forward+backward
with the library's defaults, as experiment.py's bench measures it (B=2 H=16 K=V=128 bf16).
Run with LINATTN_AUTOTUNE=0 (one compile per kernel: tiles change no allocation)."""
import torch
import torch.nn.functional as F
from kernels.delta_rule import chunk_delta_rule

for T in (2048, 8192, 16384, 32768):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, T, 16, 128, generator=g) for _ in range(3))
    beta = torch.rand(2, T, 16, generator=g)
    xs = [x.cuda().to(torch.bfloat16) for x in (q, F.normalize(k, dim=-1), v, beta)]
    for mode in ("fwd", "fwdbwd"):
        ys = [x.detach().requires_grad_(mode != "fwd") for x in xs]
        do = torch.randn_like(ys[2])

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    return chunk_delta_rule(*ys)
            return torch.autograd.grad(chunk_delta_rule(*ys)[0], ys, do)
        step(); torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        step(); torch.cuda.synchronize()
        print(f"peak T={T:6d} {mode:7s} chunk {(torch.cuda.max_memory_allocated() - base) / 2**20:8.1f} MB", flush=True)
        del do, ys
        torch.cuda.empty_cache()
