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


def _triton_available() -> str | None:
    """None when triton imports (on the CPU it runs through its interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton does not import: {exc!r}"
    return None


register(Implementation(
    op="delta_rule", name="fused_recurrent", kind="triton",
    target="kernels.delta_rule:fused_recurrent_delta_rule",
    devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16"),
    description="one pass over time, state on chip (Triton)",
    available=_triton_available,
))
