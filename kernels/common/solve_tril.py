"""The triangular solve of the chunked forms: Ai = (I + A)^{-1} for each chunk's strictly
lower-triangular A [BT, BT] (the WY / UT transform of OPERATORS.md section 1).

Blockwise, in BC x BC blocks (BC = 16), by block forward substitution on (I + A) X = I
(``inv_unit_lower``): the diagonal blocks by row substitution, the rest by products of the
block-diagonal inverse with A's off-diagonal blocks, at most third powers of a block-strictly-
lower matrix. No power of A itself is ever formed, so the solve stays as accurate as the
inverse is well-conditioned (beta near 1 with nearly parallel keys gives entries of A near 1
and a bounded inverse; a solve by repeated squaring of A sees entries grow like binomial
coefficients and cancel). float32 throughout, the whole chunk in registers.

Layout: A and Ai are [B, T, H, BT] (row t holds the entries of its chunk row), like fla.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import chunk_bounds, chunk_layout

__all__ = ["solve_tril", "inv_unit_lower"]

BC = 16  # block size of the substitution


@triton.jit
def inv_unit_lower(b_A, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
    """(I + A)^{-1} of a strictly lower-triangular float32 tile b_A [BT, BT] in registers.

    D = I + (the BC x BC diagonal blocks of A) is inverted block by block, all blocks at once,
    by substitution on a [BT/BC, BC, BC] view; then with N = D^{-1} (A - blockdiag(A)), strictly
    block-lower and so nilpotent of order BT/BC <= 4:

        (I + A)^{-1} = (I + N)^{-1} D^{-1} = (I - N)(I + N^2) D^{-1}

    which is block forward substitution written as three products of [BT, BT] tiles.
    """
    NB: tl.constexpr = BT // BC
    o = tl.arange(0, BT)
    o_nb = tl.arange(0, NB)
    o_c = tl.arange(0, BC)
    diag4 = o_nb[:, None, None, None] == o_nb[None, None, :, None]  # [NB, 1, NB, 1]
    # [NB, BC, BC]: the diagonal blocks of A
    b_Ad = tl.sum(tl.where(diag4, tl.reshape(b_A, [NB, BC, NB, BC]), 0.), 2)
    b_X = tl.zeros([NB, BC, BC], dtype=tl.float32)
    for r in tl.static_range(BC):
        # X[r] = e_r - A_d[r] X, in every block
        b_a = tl.sum(tl.where(o_c[None, :, None] == r, b_Ad, 0.), 1)  # [NB, BC]
        b_a = tl.where(o_c[None, :] < r, b_a, 0.)
        b_row = tl.where(o_c[None, :] == r, 1., 0.) - tl.sum(b_a[:, :, None] * b_X, 1)
        b_X = tl.where(o_c[None, :, None] == r, b_row[:, None, :], b_X)
    # [BT, BT]: D^{-1}, block diagonal
    b_D = tl.reshape(tl.where(diag4, tl.expand_dims(b_X, 2), 0.), [BT, BT])
    same = (o[:, None] // BC) == (o[None, :] // BC)
    eye = tl.where(o[:, None] == o[None, :], 1., 0.)
    b_N = tl.dot(b_D, tl.where(same, 0., b_A), input_precision=PRECISION)
    b_N2 = tl.dot(b_N, b_N, input_precision=PRECISION)
    b_DN = tl.dot(eye + b_N2, b_D, input_precision=PRECISION)
    return tl.dot(eye - b_N, b_DN, input_precision=PRECISION)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def solve_tril_kernel(
    A, Ai, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_b, T, BT, IS_VARLEN)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < eos - bos
    o_row = (bos + o_t) * H + i_h
    o_c = tl.arange(0, BT)
    # [BT, BT]; rows past the sequence end read as 0, so they invert to identity rows
    b_A = tl.load(A + o_row[:, None] * BT + o_c[None, :],
                  mask=m_t[:, None] & (o_c[:, None] > o_c[None, :]), other=0.)
    b_Ai = inv_unit_lower(b_A, BT, BC, PRECISION)
    tl.store(Ai + o_row[:, None] * BT + o_c[None, :], b_Ai, mask=m_t[:, None])


def solve_tril(A: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
               chunk_indices: torch.Tensor | None = None) -> torch.Tensor:
    """(I + A)^{-1} per chunk: A [B, T, H, BT] float32 strictly lower per chunk -> float32."""
    B, T, H, BT = A.shape
    if BT % BC:
        raise ValueError(f"solve_tril: the chunk size must be a multiple of {BC}, got {BT}")
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = chunk_layout(B, T, cu_seqlens, BT)[2]
    NT = triton.cdiv(T, BT) if cu_seqlens is None else len(chunk_indices)
    Ai = torch.empty_like(A, dtype=torch.float32)
    if NT:
        solve_tril_kernel[(NT, B * H)](A, Ai, cu_seqlens, chunk_indices, T, H=H, BT=BT, BC=BC,
                                       PRECISION="ieee", num_warps=4)
    return Ai
