"""chunk_delta_rule in one dtype over the head-dim classes the kernels tile differently, against
the float64 chunked reference: o, the final state and every gradient, plus chunk_fwd_o alone.

    PYTHONPATH=$PWD python3 reports/delta_rule/tile_sweep.py DTYPE K,V [K,V ...]
    VARIANT=min32 | warps8:NAME[,NAME]: see variants.py

Head dims map to tiles as utils.tile does (up to 64 -> one 64-wide tile, masked; 128 -> two;
256 -> four; under min32, 32 -> one 32-wide tile), so K, V in {32, 64, 128, 256} cover every
tiling of the K and V loops.
Prints one line per (K, V): the worst relative error and where; bf16 rounding gives <= ~1e-2.
"""
import os
import sys

import torch

import kernels.common.chunk_output as co
from harness.cases import Case, sample
from harness.check import cast_args, rel_error, run
from harness.registry import get
from kernels.common.chunk_state import chunk_fwd_h
from kernels.common.utils import chunk_layout
from kernels.delta_rule.wy import wy_fwd
from variants import VARIANT, sweep_case

dtype = getattr(torch, sys.argv[1])
dev = "cuda" if torch.cuda.is_available() else "cpu"
T = int(os.environ.get("T", "200"))
for kv in sys.argv[2:]:
    K, V = map(int, kv.split(","))
    case = sweep_case(K, V, T)
    a64 = sample(case, dev)
    truth = run(get("delta_rule", "chunk_ref").load(), a64, case, torch.float64, None)
    douts = {n: torch.randn_like(t) for n, t in truth.outputs.items() if t is not None}
    truth = run(get("delta_rule", "chunk_ref").load(), a64, case, torch.float64, douts)
    got = run(get("delta_rule", "chunk").load(), a64, case, dtype, douts)
    errs = {n: rel_error(got.outputs[n], t) for n, t in truth.outputs.items() if t is not None}
    errs.update({"d" + n: rel_error(got.grads.get(n), g) for n, g in truth.grads.items() if g is not None})
    # the output stage alone, fed its actual inputs, against its own math in float64
    a = cast_args(a64, case, dtype, grad=False)
    q, k, v, beta = a["q"], a["k"], a["v"], a["beta"]
    N, NT, ci, cof = chunk_layout(1, T, None, 64)
    Ai, w, u = wy_fwd(k, v, beta, None, ci, NT, 64)
    h, v_new, _ = chunk_fwd_h(k, w, u, a["initial_state"], False, None, cof, N, NT, 64)
    scale = K ** -0.5
    o = co.chunk_fwd_o(q, k, v_new, h, scale, None, ci, NT, 64)
    ref = torch.empty(T, 2, V, dtype=torch.float64, device=dev)
    for i in range(NT):
        s, e = 64 * i, min(64 * i + 64, T)
        Q, Kc, Vn = (x[0, s:e].transpose(0, 1).double() for x in (q, k, v_new))
        ref[s:e] = (scale * (Q @ h[0, i].double() + (Q @ Kc.transpose(1, 2)).tril() @ Vn)).transpose(0, 1)
    errs["fwd_o stage"] = rel_error(o[0], ref)
    # parallel_delta_rule (forward only, no states in its API) on the same inputs
    case_p = Case(op="delta_rule", dims=dict(B=1, T=T, H=2, K=K, V=V), seed=11)
    ap = sample(case_p, dev)
    truth_p = run(get("delta_rule", "chunk_ref").load(), ap, case_p, torch.float64, None)
    got_p = run(get("delta_rule", "parallel").load(), ap, case_p, dtype, None)
    errs["parallel o"] = rel_error(got_p.outputs["o"], truth_p.outputs["o"])
    worst = max(errs, key=errs.get)
    print(f"{sys.argv[1]} {VARIANT or 'default'} K={K} V={V}: worst {worst} {errs[worst]:.2e} | "
          + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
