"""Fill TRITON_CACHE_DIR in parallel: each job runs one implementation's fwd+bwd once at one
shape/dtype, in its own process, so that later timed runs find every config compiled.
Autotune timings from here are not cached (TRITON_CACHE_AUTOTUNING=0): the GPU is shared.

    PYTHONPATH=/tmp/site:$PWD python3 reports/delta_rule/prewarm.py NAME:DTYPE:B:T:H:D:H0 ...
"""
import os, sys, time, itertools
import multiprocessing as mp

def job(args):
    name, dtype, B, T, H, D, h0 = args
    os.environ["TRITON_CACHE_AUTOTUNING"] = "0"
    import torch
    import torch.nn.functional as F
    t0 = time.time()
    try:
        import kernels.delta_rule.chunk as cm
        import kernels.common.chunk_state as cs
        from kernels.delta_rule.fused_recurrent import fused_recurrent_delta_rule
        import fla.ops.delta_rule as fdr
        if name.startswith("chunk_"):   # chunk[_fused]_{split,tf32,round}
            cm.FUSED_WY_FWD = "_fused" in name
            cs.FWD_MIXED = name.rsplit("_", 1)[1] if name.rsplit("_", 1)[1] in ("split", "tf32", "round") else "split"
            fn = cm.chunk_delta_rule
        else:
            fn = dict(chunk=cm.chunk_delta_rule, fla_chunk=fdr.chunk_delta_rule,
                      fused_recurrent=fused_recurrent_delta_rule,
                      fla_fused_recurrent=fdr.fused_recurrent_delta_rule)[name]
        dt = getattr(torch, dtype)
        q = torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True)
        k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(dt).requires_grad_()
        v = torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True)
        beta = torch.rand(B, T, H, device="cuda", dtype=dt).requires_grad_()
        s0 = torch.randn(B, H, D, D, device="cuda", requires_grad=True) if h0 else None
        o, ht = fn(q, k, v, beta, initial_state=s0, output_final_state=h0)
        loss = o.float().sum() + (ht.float().sum() if ht is not None else 0)
        loss.backward()
        with torch.no_grad():
            fn(q, k, v, beta, initial_state=s0, output_final_state=h0)
        torch.cuda.synchronize()
        return f"prewarm {name} {dtype} D={D} h0={h0}: {time.time() - t0:.1f}s"
    except Exception as e:
        return f"prewarm {name} {dtype} D={D} h0={h0}: FAILED {type(e).__name__}: {str(e)[:300]}"

if __name__ == "__main__":
    jobs = []
    for spec in sys.argv[1:]:   # name:dtype:B:T:H:D:h0
        n, dt, B, T, H, D, h0 = spec.split(":")
        jobs.append((n, dt, int(B), int(T), int(H), int(D), h0 == "1"))
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(len(jobs), 14)) as pool:
        for r in pool.imap_unordered(job, jobs):
            print(f"[{time.time() - t0:6.1f}s] {r}", flush=True)
