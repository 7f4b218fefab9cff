"""Titans' implementations: the two references and the softmax baseline. (Our Triton kernel
is yet to come.)

fla-core 0.6.0's ``fla.ops.titans.chunk_titans_linear`` is **not registered**: it is a
pure-PyTorch loop on ``[B, H, T, D]`` tensors with positional arguments, no ``scale`` (q is not
scaled), no initial momentum and no final momentum, and its LayerNorm backward differs from the
contract (docs/operators.md, Titans): it computes ``D * gx - sum(gx) / (D * sigma) - x *
sum(gx * x) / (D * sigma)`` (operator precedence) where the contract has ``(D * gx - sum(gx) -
x * sum(gx * x)) / (D * sigma)``. Its math is not ours, so checking it against our reference
would only report that.
"""

from __future__ import annotations

from harness.impls.common import references, sdpa
from references.operators import TITANS

IMPLEMENTATIONS = [*references(TITANS), sdpa("titans")]
