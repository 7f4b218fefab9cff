"""Which forward stage of chunk_delta_rule goes wrong on a case, and in which chunk.

    PYTHONPATH=$PWD python3 reports/delta_rule/fwd_localize.py DTYPE 'CASE_JSON'

Runs the stages one by one in DTYPE (l2norm, wy_fwd, chunk_fwd_h, chunk_fwd_o; and the fused
walk chunk_fwd_h_o) and checks each against its own math in float64, fed the stage's actual
inputs (the previous stage's kernel outputs), chunk by chunk. A right stage is off by its
rounding only (~1e-2 or less in bf16, norm-relative per chunk); printed: the worst chunks.
"""
import sys

import torch
import torch.nn.functional as F

from harness.cases import Case, sample
from harness.check import cast_args
from kernels.common.chunk_state import chunk_fwd_h, chunk_fwd_h_o
from kernels.common.chunk_output import chunk_fwd_o
from kernels.common.l2norm import l2norm_fwd
from kernels.common.utils import chunk_layout
from kernels.delta_rule.wy import wy_fwd

BT = 64
f64 = torch.float64
dtype, case = getattr(torch, sys.argv[1]), Case.from_json(sys.argv[2])
dev = "cuda" if torch.cuda.is_available() else "cpu"
a = cast_args(sample(case, dev), case, dtype, grad=False)
q, k, v, beta, cu = a["q"], a["k"], a["v"], a["beta"], a["cu_seqlens"]
B, T, H, K = k.shape
scale = a["scale"] if a["scale"] is not None else K ** -0.5
N, NT, ci, co = chunk_layout(B, T, cu, BT)
bounds = [(0, int(b) * T, int(b + 1) * T) for b in range(B)] if cu is None else \
    [(0, int(cu[n]), int(cu[n + 1])) for n in range(N)]
chunks = [(n, s, min(s + BT, e)) for n, (_, b, e) in enumerate(bounds) for s in range(b, e, BT)]
flat = lambda x: x.reshape(B * T, H, -1).to(f64)  # [rows, H, D]


def err(x, ref):
    return ((x.to(f64) - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def report(stage, pairs):
    """pairs: per chunk (label, kernel value, float64 value)."""
    worst = sorted(((err(x, r), lab) for lab, x, r in pairs), reverse=True)
    total = max(e for e, _ in worst)
    print(f"{stage:12s} worst chunk {total:.2e}: " + ", ".join(f"{lab} {e:.1e}" for e, lab in worst[:4]))


if a["use_qk_l2norm_in_kernel"]:
    (qn, _), (kn, _) = l2norm_fwd(q), l2norm_fwd(k)
    report("l2norm", [("q", qn, F.normalize(q.to(f64), dim=-1)), ("k", kn, F.normalize(k.to(f64), dim=-1))])
    q, k = qn, kn
Ai, w, u = wy_fwd(k, v, beta, cu, ci, NT, BT)
kf, vf, bf, wf, uf, Aif = flat(k), flat(v), flat(beta), flat(w), flat(u), flat(Ai)
pa, pw, pu = [], [], []
for n, s, e in chunks:
    C = e - s
    Kc, Vc, bc = kf[s:e].transpose(0, 1), vf[s:e].transpose(0, 1), bf[s:e].transpose(0, 1)  # [H,C,*]
    A = torch.eye(C, dtype=f64, device=dev) + (bc * (Kc @ Kc.transpose(1, 2))).tril(-1)
    X = torch.linalg.inv(A)
    lab = f"seq{n}@{s}+{C}"
    pa.append((lab, Aif[s:e, :, :C].transpose(0, 1), X))
    pw.append((lab, wf[s:e].transpose(0, 1), X @ (bc * Kc)))
    pu.append((lab, uf[s:e].transpose(0, 1), X @ (bc * Vc)))
report("wy Ai", pa)
report("wy w", pw)
report("wy u", pu)
h, v_new, _ = chunk_fwd_h(k, w, u, None, False, cu, co, N, NT, BT)
hf, vnf = h.reshape(-1, H, K, v.shape[-1]).to(f64), flat(v_new)
ph, pv, po = [], [], []
S = None
for i, (n, s, e) in enumerate(chunks):
    if i == 0 or chunks[i - 1][0] != n:
        S = torch.zeros(H, K, v.shape[-1], dtype=f64, device=dev)
    lab = f"seq{n}@{s}+{e - s}"
    ph.append((lab, hf[i], S))
    Wc, Uc, Kc = wf[s:e].transpose(0, 1), uf[s:e].transpose(0, 1), kf[s:e].transpose(0, 1)
    Vn = Uc - Wc @ S
    pv.append((lab, vnf[s:e].transpose(0, 1), Vn))
    S = S + Kc.transpose(1, 2) @ Vn
report("walk h", ph)
report("walk v'", pv)
o = chunk_fwd_o(q, k, v_new, h, scale, cu, ci, NT, BT)
o2, _, _, _ = chunk_fwd_h_o(q, k, w, u, scale, None, False, False, cu, co, N, NT, BT)
qf, of, o2f = flat(q), flat(o), flat(o2)
for name, out in (("output", of), ("fused walk", o2f)):
    pairs = []
    for i, (n, s, e) in enumerate(chunks):
        Qc, Kc, Vn = qf[s:e].transpose(0, 1), kf[s:e].transpose(0, 1), vnf[s:e].transpose(0, 1)
        ref = scale * (Qc @ hf[i] + (Qc @ Kc.transpose(1, 2)).tril() @ Vn)
        pairs.append((f"seq{n}@{s}+{e - s}", out[s:e].transpose(0, 1), ref))
    report(name, pairs)
if dev == "cuda":
    torch.cuda.synchronize()
print("done")
