"""The forward state walk alone, ours (pinned config BV=32, 4 warps, 3 stages; LINATTN_AUTOTUNE=0)
in each product mode and u dtype, beside fla's chunk_gated_delta_rule_fwd_h (its autotune),
same inputs: B=2 T=32768 H=16 K=V=128 bf16.

    LINATTN_AUTOTUNE=0 PYTHONPATH=/tmp/site:$PWD python3 reports/delta_rule/fwdh_bench.py
"""
import os, torch, triton
import torch.nn.functional as F
from triton.testing import do_bench
assert os.environ.get("LINATTN_AUTOTUNE") == "0"
import kernels.common.chunk_state as cs
from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
B, T, H, D, BT = 2, 32768, 16, 128, 64
g = torch.Generator(device="cuda").manual_seed(0)
k = F.normalize(torch.randn(B, T, H, D, device="cuda", generator=g), dim=-1).to(torch.bfloat16)
w = (0.5 * torch.randn(B, T, H, D, device="cuda", generator=g) / D ** 0.5).to(torch.bfloat16)
u32 = torch.randn(B, T, H, D, device="cuda", generator=g)
NT = triton.cdiv(T, BT)
ms = do_bench(lambda: chunk_gated_delta_rule_fwd_h(k, w, u32.to(torch.bfloat16)), warmup=25, rep=200)
ub = u32.to(torch.bfloat16)
ms = do_bench(lambda: chunk_gated_delta_rule_fwd_h(k, w, ub), warmup=25, rep=200)
print(f"fwdh fla            u bf16: {ms * 1e3:7.1f} us", flush=True)
for mixed in ("round", "tf32", "split"):
    cs.FWD_MIXED = mixed
    for name, u in (("f32", u32), ("bf16", ub)):
        ms = do_bench(lambda: cs.chunk_fwd_h(k, w, u, None, False, None, None, B, NT, BT), warmup=25, rep=200)
        print(f"fwdh ours {mixed:6s}    u {name:4s}: {ms * 1e3:7.1f} us", flush=True)
ms = do_bench(lambda: chunk_gated_delta_rule_fwd_h(k, w, ub), warmup=25, rep=200)
print(f"fwdh fla (again)    u bf16: {ms * 1e3:7.1f} us", flush=True)
