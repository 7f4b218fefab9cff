"""The check's evaluation (harness.check.evaluate: float64 truth, same-dtype references,
tolerances) of ours and fla's delta rule kernels on variants of the gpu suite's k16, t1 and
tail-200 cases (K/V of 16, one token, K=V=128 dbeta). Optional args: variant name prefixes.

    LINATTN_AUTOTUNE=0 CUDA_LAUNCH_BLOCKING=1 PYTHONPATH=$PWD python3 reports/delta_rule/cases_vs_fla.py [k16 t1 tail]

A device fault (fla's recompute_w_u_fwd_kernel faults at K=16/20) ends the process: run one
variant per process.
"""
import os, sys, time, dataclasses, traceback, subprocess
import torch
T0 = time.time()
def log(*a): print(f"[{time.time()-T0:6.1f}s]", *a, flush=True)
import harness.builtin  # noqa
from harness.check import evaluate
from harness.registry import get
from harness.suites import load_suite
cases = {sc.id: sc.case for sc in load_suite("gpu").cases if sc.op == "delta_rule"}
k16, t1, t200 = cases["k16-tail-l2norm"], cases["t1-no-state"], cases["tail-200"]
R = dataclasses.replace
impls = [get("delta_rule", n) for n in ("chunk", "parallel", "fused_recurrent")]
try:
    fla = get("delta_rule", "fla_chunk"); fla.load(); impls.append(fla)
except Exception as e:
    log("fla unavailable", e)
variants = [("k16", k16), ("k16v16", R(k16, dims={**k16.dims, "V": 16})), ("k32v16", R(k16, dims={**k16.dims, "K": 32, "V": 16})),
            ("k20v12", R(k16, dims={**k16.dims, "K": 20, "V": 12}, seed=7)), ("k16-T200-h0", R(k16, dims={**k16.dims, "T": 200}, initial_state=True, seed=3))]
variants += [(f"t1-s{s}", R(t1, seed=s)) for s in (0, 1, 2, 3)]
variants += [("tail-200", t200), ("tail-200-d64", R(t200, dims={**t200.dims, "K": 64, "V": 64}))]
only = sys.argv[1:] 
for name, case in variants:
    if only and not any(name.startswith(o) for o in only):
        continue
    for dt in (("bfloat16", "float16") if name.startswith("k") else ("bfloat16",)):
        try:
            rows = evaluate(case, impls, [dt], "cuda", "random")
        except BaseException:
            traceback.print_exc(); continue
        for impl in [i.name for i in impls]:
            rr = [r for r in rows if r["impl"] == impl and r["quantity"] != "*"]
            if not rr:
                continue
            s = " ".join(f"{r['quantity']}={r['error']:.2e}{'' if r['passed'] else '!!'}/{r['tolerance']:.1e}" for r in rr)
            log(f"  {name} {dt} {impl}: {s}")
log("done")
