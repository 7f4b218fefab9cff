"""One launch of the chunk backward's dq/dk/dw kernel (kernels/common/chunk_output.py) on random
inputs, forced to NW warps, against the same formula in float64 from the same inputs.

    CUDA_LAUNCH_BLOCKING=1 PYTHONPATH=$PWD python3 reports/delta_rule/dqk_iso.py DTYPE K V T NW DQ_DTYPE
    e.g. bfloat16 16 32 65 4 float32

Found Triton 3.6's miscompile on the H100 (before utils.MIN_TILE): dq 8.6e-1, dk 1.1 at K=16
with V=32 and 4 warps (1.6e-3 at 8 warps). Prints "OK <args> dq .. dk .. dw .." (errors).
"""
import sys, torch, triton
dt = getattr(torch, sys.argv[1]); K, V, T, nw = map(int, sys.argv[2:6]); dqdt = getattr(torch, sys.argv[6])
from kernels.common import chunk_output as CO
at = CO.chunk_bwd_dqk_kernel.fn
at.configs = [triton.Config({}, num_warps=nw)]; at.cache = {}
B, H, BT = 2, 2, 64
NT = triton.cdiv(T, BT)
g = torch.Generator(device="cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dt)
q, k, do, v, dv = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, T, H, V), r(B, T, H, V)
h, dh = r(B, NT, H, K, V), r(B, NT, H, K, V)
dq, dk, dw = CO.chunk_bwd_dqk(q, k, v, h, do, dh, dv, 0.5, None, None, NT, BT, dq_dtype=dqdt)
torch.cuda.synchronize()
# reference
pad = NT * BT - T
f = lambda x: torch.nn.functional.pad(x.double(), (0, 0, 0, 0, 0, pad)).reshape(B, NT, BT, H, -1).permute(0, 1, 3, 2, 4)
Q, Kk, Vn, DO, DV = f(q), f(k), f(v), f(do), f(dv)
Hh, DH = h.double(), dh.double()
dS = torch.tril(DO @ Vn.transpose(-1, -2)) * 0.5
rq = 0.5 * DO @ Hh.transpose(-1, -2) + dS @ Kk
rk = Vn @ DH.transpose(-1, -2) + dS.transpose(-1, -2) @ Q
rw = -DV @ Hh.transpose(-1, -2)
gg = lambda x: x.permute(0, 1, 3, 2, 4).reshape(B, NT * BT, H, -1)[:, :T]
e = lambda x, y: ((x.double() - gg(y)).norm() / gg(y).norm()).item()
print(f"OK {sys.argv[1:]} dq {e(dq, rq):.1e} dk {e(dk, rk):.1e} dw {e(dw, rw):.1e}", flush=True)
