"""chunk_titans_linear's walk and its replay as one launch (chunk.REPLAY_OVERLAP): the programs
that form a segment's outputs run while the walk goes on, each once the walk has passed its
segment, instead of after the whole walk.

The walk (walk.walk_sequence, one program per sequence and head) is a chain of mini-batches that
holds a few of the GPU's processors; the segment programs (outputs.segment_outputs) need only
the state the walk stored at their segment's start and the G of its mini-batches. Here the
first N H programs to start walk and signal after each segment (minibatch.step_signal); the
rest take the segments in the order the walk reaches them (the first segment of every sequence,
then the second, ...) and wait for theirs (minibatch.step_wait). Program ids come from a counter,
so a segment program waits only on walks already running.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.titans.outputs import segment_outputs
from kernels.titans.walk import walk_sequence

__all__ = ["chunk_titans_linear_fwd_overlap_kernel"]


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'USE_INITIAL_MOMENTUM': lambda a: a['s0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T', 'NW'])
def chunk_titans_linear_fwd_overlap_kernel(
    q, k, v, w, b, o, theta, alpha, eta, gc, gn, ga, gf, h0, s0, ht, st, hs, ss, gs, flags,
    cu_seqlens, chunk_offsets, segment_offsets, segment_indices, segment_order, scale, eps, T,
    NW, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    EVERY: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    UMIXED: tl.constexpr, OMIXED: tl.constexpr, GPRECISION: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_INITIAL_MOMENTUM: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, PREFETCH: tl.constexpr, GATES_AHEAD: tl.constexpr,
    ACCUMULATE: tl.constexpr, SCALES: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Ticket i (flags[0], a zeroed counter) below NW = N H: the walk of sequence and head i,
    storing the state every segment of EVERY mini-batches starts from and every G (hs, ss, gs),
    flags[1 + i] set to g + 1 once segment g is stored. Ticket NW + j: rows of a segment (as
    chunk_titans_linear_fwd_segment_kernel's programs, EVERY C // ROWS a segment, for each
    batch entry and head), the segments in the order of their index in their sequence
    (segment_order, for varlen: the segments' rows of segment_indices so sorted)."""
    i = tl.atomic_add(flags, 1)
    if i < NW:
        walk_sequence(
            i, q, k, v, w, b, theta, alpha, eta, gc, gn, h0, s0, ht, st, hs, ss, hs, ss, hs, ss,
            gs, gs, flags + 1, cu_seqlens, chunk_offsets, segment_offsets, scale, eps, T, H, D,
            BD, BC, EVERY, PRECISION, MIXED, UMIXED, OMIXED, USE_INITIAL_STATE,
            USE_INITIAL_MOMENTUM, STORE_FINAL_STATE, True, False, False, True, False, PREFETCH,
            GATES_AHEAD, ACCUMULATE, SCALES, False, True, IS_VARLEN)
    else:
        BLOCKS: tl.constexpr = EVERY * BC // ROWS
        BH = NW  # the segment kernel's second grid axis: B H (N = B), for varlen H
        if IS_VARLEN:
            BH = H
        j = i - NW
        i_c = j // (BLOCKS * BH)
        if IS_VARLEN:
            i_c = tl.load(segment_order + i_c)
        segment_outputs(i_c, j // BH % BLOCKS, j % BH, q, k, w, b, o, hs, ss, gs, gc, gn, ga,
                        gf, flags + 1, cu_seqlens, chunk_offsets, segment_indices, scale, eps,
                        T, H, D, BD, BC, EVERY, ROWS, PRECISION, OMIXED, GPRECISION, True,
                        IS_VARLEN)
