"""The delta rule's implementations: the two references, our three Triton kernels, fla-core
0.6.0's three and the softmax baseline.

fla's ``chunk_delta_rule`` (no float32, no per-channel beta) and
``fused_recurrent_delta_rule`` take our arguments unchanged; ``parallel_delta_rule``
(inference only, K <= 128, no states or varlen) is adapted like our own parallel kernel.
(fla's ``fused_chunk_delta_rule`` only raises "deprecated".)
"""

from __future__ import annotations

from harness.impls.common import KERNEL_DTYPES, fla, references, sdpa, triton_available
from harness.implementation import Implementation
from references.operators import DELTA_RULE

FLA_MAX_HEAD = 128  # fla's parallel kernel holds one head in one tile


def _parallel_supports(case) -> str | None:
    """The parallel form's API has no initial state, final state, varlen or per-channel beta."""
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


def _no_per_channel_beta(case) -> str | None:
    return "per-channel beta" if case.options.get("beta_per_channel") else None


def _fla_parallel_supports(case) -> str | None:
    if case.dims["K"] > FLA_MAX_HEAD:
        return f"K > {FLA_MAX_HEAD} in fla's parallel_delta_rule"
    return _parallel_supports(case)


def _fla_parallel_delta_rule(q, k, v, beta, scale=None, initial_state=None,
                             output_final_state=False, use_qk_l2norm_in_kernel=False,
                             cu_seqlens=None):
    """fla's parallel_delta_rule under our arguments (it has no states, varlen or l2norm)."""
    from fla.ops.delta_rule.parallel import parallel_delta_rule

    if initial_state is not None or output_final_state or cu_seqlens is not None \
            or use_qk_l2norm_in_kernel:
        raise ValueError("fla_parallel (delta_rule): parallel_delta_rule takes no initial_state, "
                         "output_final_state, cu_seqlens or use_qk_l2norm_in_kernel")
    return parallel_delta_rule(q, k, v, beta, scale=scale)[0], None


IMPLEMENTATIONS = [
    *references(DELTA_RULE),
    Implementation(
        op="delta_rule", name="fused_recurrent", kind="triton",
        target="kernels.delta_rule:fused_recurrent_delta_rule",
        dtypes=KERNEL_DTYPES, description="one pass over time, state on chip (Triton)",
        available=triton_available),
    Implementation(
        op="delta_rule", name="chunk", kind="triton", target="kernels.delta_rule:chunk_delta_rule",
        dtypes=KERNEL_DTYPES,
        description="chunks of 64: WY transform + chunk state passing (Triton)",
        available=triton_available,
        # bfloat16's host choices (the interpreter has no bfloat16: forced in a float16 run),
        # the recomputing backward in bfloat16's arithmetic, and the unfused WY forward
        switches=(
            {"what": "bfloat16's choices",
             "set": {"kernels.delta_rule.chunk.DK_PARTIAL_FLOAT32": False,
                     "kernels.common.chunk_state.FWD_MIXED": "round"}},
            {"what": "the recomputing backward",
             "set": {"kernels.delta_rule.chunk.SAVE_STATES": False,
                     "kernels.delta_rule.chunk.BWD_RECOMPUTE": "inputs"}},
            {"what": "the unfused WY forward",
             "set": {"kernels.delta_rule.chunk.FUSED_WY_FWD": False}},
        )),
    Implementation(
        op="delta_rule", name="parallel", kind="triton", target=_parallel_as_delta_rule,
        dtypes=KERNEL_DTYPES,
        description="attention form, O(T^2), inference only (Triton)", backward=False,
        available=triton_available, supports=_parallel_supports),
    fla("delta_rule", "fla_chunk", "fla.ops.delta_rule:chunk_delta_rule",
        ("float16", "bfloat16"), supports=_no_per_channel_beta),
    fla("delta_rule", "fla_fused_recurrent", "fla.ops.delta_rule:fused_recurrent_delta_rule",
        KERNEL_DTYPES),
    fla("delta_rule", "fla_parallel", "fla.ops.delta_rule.parallel:parallel_delta_rule",
        KERNEL_DTYPES, adapter=_fla_parallel_delta_rule, backward=False,
        supports=_fla_parallel_supports),
    sdpa("delta_rule"),
]
