"""The inputs and the error measure the delta-rule GPU experiments share (experiment.py,
parallel_bench.py): float64 draws from one seed on the CPU (the same values on every device),
unit-norm keys, sigmoid betas."""
import torch
import torch.nn.functional as F


def inputs(B, T, H, D, seed=0, dev="cpu"):
    """[q, k, v, beta, h0] in float64 on ``dev``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64))
    h0 = torch.randn(B, H, D, D, generator=g, dtype=torch.float64)
    return [x.to(dev) for x in (q, k, v, beta, h0)]


def rel(x, r):
    """||x - r|| / ||r|| in float64 on the CPU."""
    x, r = x.double().cpu(), r.double().cpu()
    return ((x - r).norm() / r.norm()).item()
