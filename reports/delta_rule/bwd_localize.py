"""Which backward stage of chunk_delta_rule goes wrong at a head-dim pair.

    PYTHONPATH=$PWD LINATTN_AUTOTUNE=0 python3 reports/delta_rule/bwd_localize.py DTYPE K,V [K,V ...]
    VARIANT=min32 | warps8:NAME[,NAME]: see variants.py

Runs the stages of the backward one by one in DTYPE (chunk_bwd_dv_local, chunk_bwd_dh,
chunk_bwd_dqk, wy_bwd), each fed the previous stage's DTYPE outputs, and runs the same stage
again in float32 on those same inputs upcast (the float32 kernels are the ones the interpreter
tests and the GPU checks pass). A right stage differs by its rounding only (~1e-2 or less in
bf16); a miscompiled one by ~1. Same case as tile_sweep.py: B=1 T=200 H=2, states, seed 11.
"""
import os
import sys

import torch

import kernels.common.chunk_output as co
import kernels.common.chunk_state as cs
import kernels.common.utils as ut
import kernels.delta_rule.wy as wy
from harness.cases import sample
from harness.check import cast_args, rel_error
from variants import VARIANT, sweep_case

BT = 64
dtype = getattr(torch, sys.argv[1])
dev = "cuda" if torch.cuda.is_available() else "cpu"
T = int(os.environ.get("T", "200"))


def up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def both(fn, *args, **kw):
    """(fn on the args as given, fn on them upcast to float32)."""
    return fn(*args, **kw), fn(*map(up, args), **{n: up(a) for n, a in kw.items()})


for kv in sys.argv[2:]:
    K, V = map(int, kv.split(","))
    case = sweep_case(K, V, T)
    a = cast_args(sample(case, dev), case, dtype, grad=False)
    q, k, v, beta, h0 = a["q"], a["k"], a["v"], a["beta"], a["initial_state"]
    scale = K ** -0.5
    N, NT, ci, cof = ut.chunk_layout(1, T, None, BT)
    Ai, w, u = wy.wy_fwd(k, v, beta, None, ci, NT, BT)
    h, v_new, _ = cs.chunk_fwd_h(k, w, u, h0, False, None, cof, N, NT, BT)
    g = torch.Generator(device=dev).manual_seed(5)
    do = torch.randn(v.shape, generator=g, device=dev).to(dtype)
    dht = torch.randn(h0.shape, generator=g, device=dev)
    errs = {}
    dvl, dvl32 = both(co.chunk_bwd_dv_local, q, k, do, scale, None, ci, NT, BT)
    errs["dv_local"] = rel_error(dvl, dvl32)
    (dh, dvn, dh0), (dh32, dvn32, dh032) = both(cs.chunk_bwd_dh, q, k, w, do, dvl, dht, scale,
                                                True, None, cof, N, NT, BT)
    errs.update({"dh": rel_error(dh, dh32), "dv'": rel_error(dvn, dvn32), "dh0": rel_error(dh0, dh032)})
    (dq, dkp, dw), (dq32, dkp32, dw32) = both(co.chunk_bwd_dqk, q, k, v_new, h, do, dh, dvn,
                                              scale, None, ci, NT, BT, dk_dtype=torch.float32)
    errs.update({"dqk dq": rel_error(dq, dq32), "dqk dk": rel_error(dkp, dkp32),
                 "dqk dw": rel_error(dw, dw32)})
    (dk, dv, db), (dk32, dv32, db32) = both(wy.wy_bwd, k, v, beta, Ai, dw, dvn, dkp, None, ci, NT, BT)
    errs.update({"wy dk": rel_error(dk, dk32), "wy dv": rel_error(dv, dv32), "wy dbeta": rel_error(db, db32)})
    worst = max(errs, key=errs.get)
    print(f"{sys.argv[1]} {VARIANT or 'default'} K={K} V={V}: worst {worst} {errs[worst]:.2e} | "
          + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
if dev == "cuda":
    torch.cuda.synchronize()
