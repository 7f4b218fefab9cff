"""Titans' implementations: the two references, our chunk kernel (Triton, forward and
backward) and the softmax baseline.

fla-core 0.6.0's ``fla.ops.titans.chunk_titans_linear`` is **not registered**: it is a
pure-PyTorch loop on ``[B, H, T, D]`` tensors with positional arguments, no ``scale`` (q is not
scaled), no initial momentum and no final momentum, and its LayerNorm backward differs from the
contract (docs/operators.md, Titans): it computes ``D * gx - sum(gx) / (D * sigma) - x *
sum(gx * x) / (D * sigma)`` (operator precedence) where the contract has ``(D * gx - sum(gx) -
x * sum(gx * x)) / (D * sigma)``. Its math is not ours, so checking it against our reference
would only report that. It is registered as ``fla_torch``, a *baseline*: timed (the Titans
issue asks ours to be 1000x faster at T = 2048), never checked. It runs in float32 only: with
bfloat16 inputs it stops at its first product of a float32 state and a bfloat16 row
("expected scalar type BFloat16 but found Float", H200, 2026-12-04), so half-precision inputs
are taken to float32 for it and its output back.
"""

from __future__ import annotations

import functools

from harness.impls.common import KERNEL_DTYPES, fla_imports, references, sdpa, triton_available
from harness.implementation import Implementation
from references.operators import TITANS


def _fla_torch(q, k, v, w, b, theta, alpha, eta, scale=None, eps=1e-6, chunk_size=16,
               initial_state=None, initial_momentum=None, output_final_state=False,
               cu_seqlens=None):
    """fla's PyTorch form on our layout, for timing: [B, T, H, ...] moved to its [B, H, T, ...],
    in float32, and q scaled here (it takes no scale); its own math (module docstring)."""
    from fla.ops.titans import chunk_titans_linear

    def heads_first(x):
        return x.transpose(1, 2).float().contiguous()

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, _ = chunk_titans_linear(heads_first(q) * scale, heads_first(k), heads_first(v), w.float(),
                               b.float(), heads_first(theta), heads_first(alpha),
                               heads_first(eta), eps, chunk_size, initial_state,
                               output_final_state)
    return o.transpose(1, 2).to(v.dtype), None, None


def _fla_torch_supports(case) -> str | None:
    chunk = case.options.get("chunk_size", 16)
    if case.seqlens is not None:
        return "fla's PyTorch Titans has no cu_seqlens"
    if case.dims["T"] % chunk:
        return f"fla's PyTorch Titans needs T a multiple of chunk_size={chunk}"
    if case.initial_state:
        return "fla's PyTorch Titans has no initial momentum"
    return None


def _ours_supports(case) -> str | None:
    from kernels.titans.chunk import unsupported

    why = unsupported(case.dims["D"], case.options.get("chunk_size", 16))
    return None if why is None else f"our Titans kernel: {why}"


# chunk's switches (kernels/titans/chunk.py). The one-walk backward (fused_bwd.py): under half
# the split backward's extra peak memory for 1.8x its fwd+bwd time (H100, reports/titans.md).
# Every product of half-precision inputs in three TF32 passes (the last backward kernel's
# exactly) and the gate factors formed in the walk: the defaults before 2026-12-06, bfloat16's
# closest to float64 and its slowest (fwd+bwd 13.7 ms at T = 8K, D = 64 on an H100, against
# 10.2 with the walks in one TF32 product; reports/titans.md).
# The states a call with a backward stores in float32 (chunk.HALF_STATES_BACKWARD None; the
# default stores them in float16 for bfloat16 inputs, rows scaled, with each mini-batch's Z
# beside them): fwd+bwd 6.07 ms at T = 8K, D = 64 on an H100, against 5.68, with every walk's
# Z in "split_trunc" (reports/titans.md).
# Registered switches are compiled by the compile tests and compared by tools/switch_compare.py.
_ONE_WALK = {"what": "one-walk backward (less memory)",
             "set": {"kernels.titans.chunk.SPLIT_BACKWARD": False}}
_TF32X3 = {"what": "three TF32 passes, gates in the walk",
           "set": {"kernels.titans.chunk.WALK_MIXED": None,
                   "kernels.titans.chunk.UPDATE_MIXED": None,
                   "kernels.titans.chunk.TRAINING_WALK_MIXED": None,
                   "kernels.titans.chunk.BACKWARD_WALK_MIXED": None,
                   "kernels.titans.chunk.OUTPUT_MIXED": None,
                   "kernels.titans.chunk_bwd.DK_PRECISION": None,
                   "kernels.titans.chunk.HALF_STATES": None,
                   "kernels.titans.chunk.HALF_STATES_BACKWARD": None,
                   "kernels.titans.chunk.WALK_PRODUCTS": None,
                   "kernels.titans.chunk.REPLAY": None,
                   "kernels.titans.chunk.WALK_ACCUMULATE": False,
                   "kernels.titans.chunk.WALK_GATES_AHEAD": False}}
_FLOAT32_STATES_BACKWARD = {"what": "float32 states for the backward",
                            "set": {"kernels.titans.chunk.HALF_STATES_BACKWARD": None}}
# The backward walk by column pairs at D > 64, on CPU tensors too: for harness compile, whose
# recording runs no kernel; the interpreter cannot run a pair (kernels/titans/chunk_bwd.py,
# WALK_SLICES, CPU_WALK_SLICES). On a GPU it is the defaults' form.
_PAIRED_WALK_RECORDED = {"what": "backward walk by column pairs, recorded on the CPU",
                         "set": {"kernels.titans.chunk_bwd.WALK_SLICES": {128: 2},
                                 "kernels.titans.chunk_bwd.CPU_WALK_SLICES": 2}}

# The forward walk and the segment kernel's programs in one launch (kernels/titans/overlap.py):
# the forward at D = 64 17-21% faster on an H100 (reports/titans.md), off until its tiling
# classes are checked on a GPU.
_REPLAY_OVERLAP = {"what": "walk and replay in one launch",
                   "set": {"kernels.titans.chunk.REPLAY_OVERLAP": True}}

IMPLEMENTATIONS = [
    *references(TITANS),
    Implementation(
        op="titans", name="chunk", kind="triton", target="kernels.titans:chunk_titans_linear",
        dtypes=KERNEL_DTYPES,
        description="memory and momentum walked per mini-batch, outputs in parallel (Triton)",
        available=triton_available, supports=_ours_supports, inference_path=True,
        switches=(_ONE_WALK, _TF32X3, _FLOAT32_STATES_BACKWARD, _PAIRED_WALK_RECORDED,
                  _REPLAY_OVERLAP)),
    Implementation(
        op="titans", name="fla_torch", kind="baseline", target=_fla_torch, devices=("cuda",),
        dtypes=KERNEL_DTYPES, description="fla-core chunk_titans_linear: PyTorch, its own math "
        "(timed, not checked)", available=functools.partial(fla_imports, "fla.ops.titans"),
        supports=_fla_torch_supports),
    sdpa("titans"),
]
