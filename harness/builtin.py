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


def _parallel_supports(case) -> str | None:
    """parallel_delta_rule's API has no initial state, final state, varlen or per-channel beta."""
    if case.initial_state or case.output_final_state or case.seqlens is not None:
        return "no initial/final state or cu_seqlens in the parallel API"
    if case.options.get("beta_per_channel") or case.options.get("use_qk_l2norm_in_kernel"):
        return "per-token beta and unnormalised q, k only"
    return None


def _parallel_as_delta_rule(q, k, v, beta, scale=None, initial_state=None,
                            output_final_state=False, use_qk_l2norm_in_kernel=False,
                            cu_seqlens=None):
    """parallel_delta_rule under the operator's canonical arguments (the ones it lacks must
    hold their defaults, which ``_parallel_supports`` guarantees)."""
    from kernels.delta_rule.parallel import parallel_delta_rule

    return parallel_delta_rule(q, k, v, beta, scale=scale)[0], None


register(Implementation(
    op="delta_rule", name="fused_recurrent", kind="triton",
    target="kernels.delta_rule:fused_recurrent_delta_rule",
    devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16"),
    description="one pass over time, state on chip (Triton)",
    available=_triton_available,
))
register(Implementation(
    op="delta_rule", name="chunk", kind="triton",
    target="kernels.delta_rule:chunk_delta_rule",
    devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16"),
    description="chunks of 64: WY transform + chunk state passing (Triton)",
    available=_triton_available,
    # bfloat16's host choices (the interpreter has no bfloat16: forced in a float16 run), the
    # recomputing backward in bfloat16's arithmetic, and the unfused WY forward
    switches=(
        {"what": "bfloat16's choices", "set": {"kernels.delta_rule.chunk.DK_PARTIAL_FLOAT32": False,
                                               "kernels.common.chunk_state.FWD_MIXED": "round"}},
        {"what": "the recomputing backward", "set": {"kernels.delta_rule.chunk.SAVE_STATES": False,
                                                     "kernels.delta_rule.chunk.BWD_RECOMPUTE": "inputs"}},
        {"what": "the unfused WY forward", "set": {"kernels.delta_rule.chunk.FUSED_WY_FWD": False}},
    ),
))
register(Implementation(
    op="delta_rule", name="parallel", kind="triton",
    target=_parallel_as_delta_rule,
    devices=("cpu", "cuda"), dtypes=("float32", "float16", "bfloat16"),
    description="attention form, O(T^2), inference only (Triton)", backward=False,
    available=_triton_available, supports=_parallel_supports,
))
