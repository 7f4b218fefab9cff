"""GPU experiment: parallel_delta_rule (today's) beside its version of commit 18875ad
(every product float32 in three TF32 passes), accuracy then speed, in one process.

    git show 18875ad:kernels/delta_rule/parallel.py > reports/delta_rule/parallel_v1.py
    PYTHONPATH=$PWD python3 reports/delta_rule/parallel_bench.py WHAT [T,...]

WHAT: any of warm (compile both at B=2 T=2048 H=16 D=128 bf16, with and without A), acc
(errors against the float64 chunked reference on the same rounded inputs: bf16 and fp16 at
B=2 T=1000 H=4 D=64 and B=2 T=2048 H=4 D=128 scale 1 (the gpu suite's "stateless"), float32 at
the first; A against the old kernel's at T=1000), bench (median ms of do_bench, B=2 H=16
K=V=128 bf16, output only; the old kernel only up to OLD_MAX_T, default 8192: 1.1 s a call at
32K). Uses kernels/ and references/ only."""
import os, sys
import torch
from triton.testing import do_bench
from kernels.delta_rule.parallel import parallel_delta_rule as new
from references.delta_rule import chunk_delta_rule_ref
sys.path.insert(0, os.path.dirname(__file__))
from parallel_v1 import parallel_delta_rule as old
import exp_inputs
from exp_inputs import rel

what = sys.argv[1].split(",")
Ts = [int(t) for t in sys.argv[2].split(",")] if len(sys.argv) > 2 else [2048, 8192, 32768]
OLD_MAX_T = int(os.environ.get("OLD_MAX_T", "8192"))
IMPLS = {"parallel": new, "parallel_v1": old}


def inputs(B, T, H, D):
    return exp_inputs.inputs(B, T, H, D)[:4]


if "warm" in what:
    xs = [x.cuda().to(torch.bfloat16) for x in inputs(2, 2048, 16, 128)]
    for name, fn in IMPLS.items():
        for attn in (False, True):
            fn(*xs, output_attentions=attn)
    torch.cuda.synchronize()
    print("warm done", flush=True)

if "acc" in what:
    for (B, T, H, D, scale) in [(2, 1000, 4, 64, None), (2, 2048, 4, 128, 1.0)]:
        x64 = inputs(B, T, H, D)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            if dt == torch.float32 and T != 1000:
                continue
            xr = [x.to(dt).double() for x in x64]  # the rounded inputs
            truth = chunk_delta_rule_ref(*[x.cuda() for x in xr], scale=scale)[0]
            same = chunk_delta_rule_ref(*[x.cuda().to(dt) for x in xr], scale=scale)[0]
            xs = [x.cuda().to(dt) for x in xr]
            errs = {name: rel(fn(*xs, scale=scale)[0], truth) for name, fn in IMPLS.items()}
            line = " ".join(f"{n}={e:.2e}" for n, e in errs.items())
            print(f"acc B={B} T={T} H={H} D={D} {str(dt)[6:]:9s} o: {line} ref_same_dtype={rel(same, truth):.2e}", flush=True)
    xs = [x.cuda().to(torch.bfloat16) for x in inputs(2, 1000, 4, 64)]
    a_new, a_old = new(*xs, output_attentions=True)[1], old(*xs, output_attentions=True)[1]
    print(f"acc attention bf16 T=1000: new vs old {rel(a_new, a_old):.2e}", flush=True)

if "bench" in what:
    B, H, D = 2, 16, 128
    for T in Ts:
        xs = [x.cuda().to(torch.bfloat16) for x in inputs(B, T, H, D)]
        for name, fn in IMPLS.items():
            if name == "parallel_v1" and T > OLD_MAX_T:
                continue
            with torch.no_grad():
                ms = do_bench(lambda: fn(*xs), warmup=5 if T > 8192 else 25,
                              rep=50 if T > 8192 else 100, quantiles=[0.5, 0.2, 0.8])
            blocks = (T // 64) * (T // 64 + 1) // 2 * B * H
            tflops = blocks * 3 * 2 * 64 * 64 * D / (ms[0] * 1e-3) / 1e12
            print(f"bench T={T:6d} fwd {name:12s} {ms[0]:9.3f} ms [{ms[1]:.3f}, {ms[2]:.3f}]  "
                  f"{tflops:6.1f} TFLOP/s of the 3-product sweep", flush=True)
        torch.cuda.empty_cache()
