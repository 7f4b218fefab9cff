"""GLA's implementations: the two references, our three Triton kernels, fla-core 0.6.0's two and
the softmax baseline. Our chunk_gla and fused_chunk_gla take the key gate alone (their
signature, docs/operators.md); fused_recurrent_gla takes gv and reverse too.

fla's ``fused_recurrent_gla`` takes our arguments unchanged (gk, gv, reverse included);
``chunk_gla`` takes the key gate as ``g`` and has no ``gv`` and no ``reverse``. (fla's
``fused_chunk_gla`` only raises "deprecated".)
"""

from __future__ import annotations

from harness.impls.common import KERNEL_DTYPES, fla, references, sdpa, triton_available
from harness.implementation import Implementation
from references.operators import GLA


def _fla_chunk_gla_supports(case) -> str | None:
    if case.options.get("gv"):
        return "no value-side gate gv in fla's chunk_gla"
    if case.options.get("reverse"):
        return "no reverse in fla's chunk_gla"
    return None


def _fla_chunk_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                   output_final_state=False, reverse=False, cu_seqlens=None):
    """fla's chunk_gla under our arguments: our key gate ``gk`` is its ``g``."""
    from fla.ops.gla import chunk_gla

    if gk is None or gv is not None or reverse:
        raise ValueError(f"fla_chunk (gla): chunk_gla needs a key gate gk and takes no gv and "
                         f"no reverse; got gk={'None' if gk is None else 'tensor'}, "
                         f"gv={'None' if gv is None else 'tensor'}, reverse={reverse}")
    return chunk_gla(q, k, v, gk, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _key_gate_only(case) -> str | None:
    if case.options.get("gv"):
        return "no value-side gate gv in chunk_gla's signature"
    if case.options.get("reverse"):
        return "no reverse in chunk_gla's signature"
    return None


def _as_gla(name: str):
    """Our chunk_gla or fused_chunk_gla under the operator's arguments (their key gate is
    ``g``; without one the gate is 0, and gv and reverse must hold their defaults:
    ``_key_gate_only``)."""
    def call(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
             output_final_state=False, reverse=False, cu_seqlens=None):
        import kernels.gla

        if gv is not None or reverse:
            raise ValueError(f"{name} takes no gv and no reverse; got "
                             f"gv={'None' if gv is None else 'tensor'}, reverse={reverse}")
        g = gk if gk is not None else q.new_zeros(q.shape)
        return getattr(kernels.gla, name)(q, k, v, g, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state,
                                          cu_seqlens=cu_seqlens)
    call.__name__ = call.__qualname__ = f"{name}_as_gla"
    return call




IMPLEMENTATIONS = [
    *references(GLA),
    Implementation(
        op="gla", name="fused_recurrent", kind="triton", target="kernels.gla:fused_recurrent_gla",
        dtypes=KERNEL_DTYPES, description="one pass over time, state on chip (Triton)",
        available=triton_available),
    Implementation(
        op="gla", name="chunk", kind="triton", target=_as_gla("chunk_gla"), dtypes=KERNEL_DTYPES,
        description="chunks of 64, key gate (Triton)", available=triton_available,
        supports=_key_gate_only,
        switches=({"what": "the backward's diagonal blocks row by row",
                   "set": {"kernels.gla.chunk_bwd.DIAG_3D": False}},
                  {"what": "A's diagonal blocks as [16, 16, K] products",
                   "set": {"kernels.gla.chunk.A_DIAG_3D": True}},
                  {"what": "A by row blocks in half precision too (no whole-chunk product)",
                   "set": {"kernels.gla.chunk.A_WHOLE_SPREAD": 0.0}},
                  {"what": "dq', dk' by row blocks in half precision too",
                   "set": {"kernels.gla.chunk_bwd.INTRA_WHOLE_SPREAD": 0.0}},
                  {"what": "the gates summed compensated in float32",
                   "set": {"kernels.common.cumsum.CUMSUM_F64": False}},
                  {"what": "dq/dk's state products in float32 (TF32 x3)",
                   "set": {"kernels.gla.chunk_bwd.STATE_DOTS_SPLIT": False}})),
    Implementation(
        op="gla", name="fused_chunk", kind="triton", target=_as_gla("fused_chunk_gla"),
        dtypes=KERNEL_DTYPES, description="chunks of 64 walked in one program, key gate (Triton)",
        available=triton_available, supports=_key_gate_only,
        switches=({"what": "A's diagonal blocks as [16, 16, K] products",
                   "set": {"kernels.gla.chunk.A_DIAG_3D": True}},
                  {"what": "A by row blocks in half precision too (no whole-chunk product)",
                   "set": {"kernels.gla.chunk.A_WHOLE_SPREAD": 0.0}})),
    fla("gla", "fla_chunk", "fla.ops.gla:chunk_gla", KERNEL_DTYPES, adapter=_fla_chunk_gla,
        supports=_fla_chunk_gla_supports),
    fla("gla", "fla_fused_recurrent", "fla.ops.gla:fused_recurrent_gla", KERNEL_DTYPES),
    sdpa("gla"),
]
