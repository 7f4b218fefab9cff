"""TTT-Linear's implementations: the two references, our chunk and fused_chunk (Triton, forward
and backward), fla-core 0.6.0's two kernels and the softmax baseline.

fla's ``chunk_ttt_linear`` and ``fused_chunk_ttt_linear`` take our arguments unchanged and
compute docs/operators.md's TTT-Linear (fla's ``naive.py`` is the same dual form: the learning
rate of the query position scales the running sum). Their kernels hold one head in one tile
(D <= 128), tile the mini-batch (chunk_size a power of two >= 16), and have no backward for
``cu_seqlens``.
"""

from __future__ import annotations

from harness.impls.common import KERNEL_DTYPES, fla, references, sdpa, triton_available
from harness.implementation import Implementation
from references.operators import TTT

FLA_MAX_HEAD = 128


def _fla_ttt_supports(case) -> str | None:
    chunk = case.options.get("chunk_size", 16)
    if case.dims["D"] > FLA_MAX_HEAD:
        return f"D > {FLA_MAX_HEAD} in fla's TTT kernels"
    if chunk < 16 or chunk & (chunk - 1):
        return f"chunk_size={chunk}: fla's TTT kernels need a power of two >= 16"
    if case.seqlens is not None:
        return "fla's TTT has no backward for cu_seqlens"
    return None


def _ours_supports(case) -> str | None:
    from kernels.ttt.fused_chunk import unsupported

    why = unsupported(case.dims["D"], case.options.get("chunk_size", 16))
    return None if why is None else f"our TTT kernels: {why}"


# chunk's switches: the walks' products with the float32 state as two half-precision halves
# instead of the state rounded (kernels/ttt/fused_chunk.py, WALK_MIXED; "tf32" and None, and
# fused_chunk under any of them, by `--set`), dK's term in its backward walk, and the states
# per mini-batch stored in float32 (fused_chunk.HALF_STATES off). Registered
# switches are compiled by the compile tests too: with all three WALK_MIXED modes on both
# kernels TTT's compile test took 7.3 minutes on 2 cores, with "split" on both 4.0 (a cold
# cache).
_WALK_SWITCHES = ({"what": "the walks' state products as two halves ('split')",
                   "set": {"kernels.ttt.fused_chunk.WALK_MIXED": "split"}},)
# Both kernels' switch: the forward's output products Q~ K^T and Q~ W in three TF32 passes of
# float32 operands instead of the default's Q~ in the inputs' dtype and W rounded
# (fused_chunk.OUTPUT_MIXED None; o's error about 0.74x the default's, the forward 1.2-1.45x
# slower).
_OUTPUT_FLOAT32 = {"what": "the outputs' Q~ K^T and Q~ W from float32 operands",
                   "set": {"kernels.ttt.fused_chunk.OUTPUT_MIXED": None}}

IMPLEMENTATIONS = [
    *references(TTT),
    Implementation(
        op="ttt", name="chunk", kind="triton", target="kernels.ttt:chunk_ttt_linear",
        dtypes=KERNEL_DTYPES,
        description="states per mini-batch walked, outputs in parallel (Triton)",
        available=triton_available, supports=_ours_supports,
        switches=(*_WALK_SWITCHES,
                  {"what": "dK's dW' term in the backward walk (no dW' stored)",
                   "set": {"kernels.ttt.chunk_bwd.DK_IN_WALK": True}},
                  {"what": "the states and dW' per mini-batch in float32",
                   "set": {"kernels.ttt.fused_chunk.HALF_STATES": False}},
                  _OUTPUT_FLOAT32)),
    Implementation(
        op="ttt", name="fused_chunk", kind="triton",
        target="kernels.ttt:fused_chunk_ttt_linear", dtypes=KERNEL_DTYPES,
        description="mini-batches walked in one program, state on chip (Triton)",
        available=triton_available, supports=_ours_supports, switches=(_OUTPUT_FLOAT32,)),
    fla("ttt", "fla_chunk", "fla.ops.ttt:chunk_ttt_linear", KERNEL_DTYPES,
        supports=_fla_ttt_supports),
    fla("ttt", "fla_fused_chunk", "fla.ops.ttt:fused_chunk_ttt_linear", KERNEL_DTYPES,
        supports=_fla_ttt_supports),
    sdpa("ttt"),
]
