"""Sums over time within chunks: ``local_scan`` (a chunk's cumulative log gates as a float32
pair, inside a kernel: GLA's gates stage, kernels/gla/chunk.py), ``pair_diff`` (the difference
of two such pairs) and ``chunk_suffix_sum`` (the rest of a chunk plus the chunk's anchor: the
gates' backward).

Within a chunk the exponents are differences b_i - b_j of cumulative log gates, which reach
-3800 at -60 a step, where one float32 rounding of the running sum is up to 1.2e-4: the sums
are kept as pairs (hi, and lo what hi lost) and differenced as (hi_i - hi_j) + (lo_i - lo_j).

For chunk_suffix_sum:
A sequence is walked in order (``reverse``: from its last token to its first) and cut, in
walking order, into chunks of BT tokens. For walking index i of chunk c,

    y_i = sum_{i <= j < end of c} x_j + anchor[c]

in float32: the log gates' gradient d g_i = sum_{j >= i} x_j (x_j = d loss / d B_j, B the
cumulative log gate, docs/operators.md section 2) summed from the chunk's anchor, the exact
d g at the next chunk's first token, so that rounding accumulates over at most BT terms and
not over the whole rest of the sequence. One program per (channel tile, chunk, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import chunk_bounds, chunk_index

__all__ = ["chunk_suffix_sum", "local_scan", "pair_diff"]

# local_scan's scan: in float64, then split into a float32 pair (True), or a compensated float32
# scan (False: for GPUs with slow float64). Both give the pair to float32's rounding. H200, the
# gates of B = 2, T = 8192, H = 16, K = 128 as a kernel of their own: 0.18 ms in float64, 0.26
# ms compensated.
CUMSUM_F64 = True


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_suffix_sum_kernel(
    x, anchor, y, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_d, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_bh % H
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_bh // H, T, BT, IS_VARLEN)
    # the chunk's index among all chunks: anchor is [chunks, H, D]
    i_g = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN)
    L = eos - bos
    o_w = i_t * BT + tl.arange(0, BT)  # walking indices
    o_d = i_d * BD + tl.arange(0, BD)
    m = (o_w < L)[:, None] & (o_d < D)[None, :]
    o_tok = L - 1 - o_w if REVERSE else o_w
    p = ((bos + o_tok) * H + i_h)[:, None] * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m, other=0.).to(tl.float32)
    b_a = tl.load(anchor + (i_g * H + i_h) * D + o_d, mask=o_d < D, other=0.)
    tl.store(y + p, (tl.cumsum(b_x, 0, reverse=True) + b_a[None, :]).to(y.dtype.element_ty),
             mask=m)


def chunk_suffix_sum(x: torch.Tensor, anchor: torch.Tensor, reverse: bool, cu_seqlens,
                     chunk_indices, NT: int, BT: int, out_dtype: torch.dtype = torch.float32):
    """x [B, T, H, D] (float32) and anchor [chunks, H, D] (float32; chunks of BT tokens in
    walking order, numbered as utils.chunk_layout numbers them) -> y [B, T, H, D]."""
    B, T, H, D = x.shape
    y = torch.empty(B, T, H, D, dtype=out_dtype, device=x.device)
    BD = min(64, triton.next_power_of_2(D))
    if NT:
        chunk_suffix_sum_kernel[(triton.cdiv(D, BD), NT, B * H)](
            x, anchor, y, cu_seqlens, chunk_indices, T, H=H, D=D, BT=BT, BD=BD, REVERSE=reverse)
    return y


@triton.jit
def _two_sum(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) + (b_hi + b_lo) as a float32 sum and its rounding error (Knuth's TwoSum:
    s + err == a_hi + b_hi exactly), the low parts added."""
    s = a_hi + b_hi
    bb = s - a_hi
    err = (a_hi - (s - bb)) + (b_hi - bb)
    return s, a_lo + b_lo + err


@triton.jit
def local_scan(b_x, F64: tl.constexpr):
    """(hi, lo): the cumulative sum of b_x [BT, BD] (float32) down its rows as a float32 pair,
    hi + lo exact to float32's rounding of the sum (F64: a float64 scan split into its float32
    rounding and the rest; else a compensated float32 scan)."""
    if F64:  # a float32 sum of <= 64 float32 terms is exact in float64 to 2^-46 of its size
        b_s = tl.cumsum(b_x.to(tl.float64), 0)
        b_hi = b_s.to(tl.float32)
        b_lo = (b_s - b_hi.to(tl.float64)).to(tl.float32)
    else:
        b_hi, b_lo = tl.associative_scan((b_x, tl.zeros_like(b_x)), 0, _two_sum)
    return b_hi, b_lo


@triton.jit
def pair_diff(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) - (b_hi + b_lo) for two local_scan pairs: the high parts first
    (exact when they are within a factor of two of each other, as two close large sums are)."""
    return (a_hi - b_hi) + (a_lo - b_lo)
