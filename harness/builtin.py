"""The built-in implementations: one entry per (operator, implementation).

Every operator has its step-by-step reference ``naive`` (the ground truth the checks compare
against) and its chunked pure-PyTorch reference ``chunk_ref``. Kernels and peers add their
entries here as they land.
"""

from __future__ import annotations

from harness.operators import OPERATORS
from harness.registry import Implementation, register

for _op in OPERATORS.values():
    register(Implementation(
        op=_op.name, name="naive", kind="reference", target=_op.reference,
        description="step-by-step recurrence of OPERATORS.md (ground truth)",
    ))
    register(Implementation(
        op=_op.name, name="chunk_ref", kind="reference", target=_op.chunk_reference,
        description="chunked pure-PyTorch form, O(T) memory",
    ))
