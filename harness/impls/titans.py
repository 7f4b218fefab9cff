"""Titans' implementations: the two references, our chunk kernel (Triton, forward and
backward) and the softmax baseline.

fla-core 0.6.0's ``fla.ops.titans.chunk_titans_linear`` is **not registered**: it is a
pure-PyTorch loop on ``[B, H, T, D]`` tensors with positional arguments, no ``scale`` (q is not
scaled), no initial momentum and no final momentum, and its LayerNorm backward differs from the
contract (docs/operators.md, Titans): it computes ``D * gx - sum(gx) / (D * sigma) - x *
sum(gx * x) / (D * sigma)`` (operator precedence) where the contract has ``(D * gx - sum(gx) -
x * sum(gx * x)) / (D * sigma)``. Its math is not ours, so checking it against our reference
would only report that.
"""

from __future__ import annotations

from harness.impls.common import KERNEL_DTYPES, references, sdpa, triton_available
from harness.implementation import Implementation
from references.operators import TITANS


def _ours_supports(case) -> str | None:
    from kernels.titans.chunk import unsupported

    why = unsupported(case.dims["D"], case.options.get("chunk_size", 16))
    return None if why is None else f"our Titans kernel: {why}"


IMPLEMENTATIONS = [
    *references(TITANS),
    Implementation(
        op="titans", name="chunk", kind="triton", target="kernels.titans:chunk_titans_linear",
        dtypes=KERNEL_DTYPES,
        description="memory and momentum walked per mini-batch, outputs in parallel (Triton)",
        available=triton_available, supports=_ours_supports),
    sdpa("titans"),
]
