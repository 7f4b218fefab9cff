"""The triangular solve of the chunked forms: Ai = (I + A)^{-1} for each chunk's strictly
lower-triangular A [BT, BT] (the WY / UT transform of docs/operators.md section 1).

Blockwise, in BC x BC blocks (BC = 16), by block forward substitution on (I + A) X = I:

    X_ii = (I + A_ii)^{-1}                               # row by row: X[r] = e_r - A_ii[r] X
    X_ij = -X_ii  sum_{j <= m < i} A_im X_mj            # j < i

Each step only multiplies entries of A by entries of the inverse itself, never forms powers of
A, so it stays as accurate as the inverse is well-conditioned (beta near 1 with nearly parallel
keys gives entries of A near 1 and a bounded inverse; a solve that forms powers of A, or
inverts larger blocks by repeated squaring, sees its entries grow like binomial coefficients).
The blocks of X a program has written are read back after a barrier. float32 throughout.

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
def inv_unit_lower(b_a, BC: tl.constexpr):
    """(I + A)^{-1} of one strictly lower-triangular [BC, BC] float32 block, row by row:
    X[r] = e_r - A[r] X (row r of X only needs the rows above it)."""
    o_r = tl.arange(0, BC)
    b_x = tl.zeros([BC, BC], dtype=tl.float32)
    for r in tl.static_range(BC):
        b_ar = tl.sum(tl.where(o_r[:, None] == r, b_a, 0.), 0)  # [BC]: row r of A
        b_row = tl.where(o_r == r, 1., 0.) - tl.sum(b_ar[:, None] * b_x, 0)
        b_x = tl.where(o_r[:, None] == r, b_row[None, :], b_x)
    return b_x


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def solve_tril_kernel(
    A, Ai, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_b, T, BT, IS_VARLEN)
    L = tl.minimum(eos - bos - i_t * BT, BT)  # rows of this chunk that hold tokens
    NB: tl.constexpr = BT // BC
    o_r = tl.arange(0, BC)
    # row r of the chunk, entry c: (bos + i_t * BT + r) * H * BT + i_h * BT + c
    base = (bos + i_t * BT) * H * BT + i_h * BT

    for i in tl.static_range(NB):
        rows = i * BC + o_r
        m_rows = rows < L
        # X_ii = (I + A_ii)^{-1}, row by row from the block held in registers
        b_aii = tl.load(A + base + rows[:, None] * H * BT + (i * BC + o_r)[None, :],
                        mask=m_rows[:, None] & (o_r[:, None] > o_r[None, :]), other=0.)
        b_x = inv_unit_lower(b_aii, BC)
        p_ii = Ai + base + rows[:, None] * H * BT + (i * BC + o_r)[None, :]
        tl.store(p_ii, b_x, mask=m_rows[:, None])
        # X_ij = -X_ii sum_{j <= m < i} A_im X_mj
        for j in tl.static_range(i):
            b_acc = tl.zeros([BC, BC], dtype=tl.float32)
            for m in tl.static_range(j, i):
                b_aim = tl.load(A + base + rows[:, None] * H * BT + (m * BC + o_r)[None, :],
                                mask=m_rows[:, None], other=0.)
                b_xmj = tl.load(Ai + base + (m * BC + o_r)[:, None] * H * BT + (j * BC + o_r)[None, :],
                                mask=((m * BC + o_r) < L)[:, None], other=0.)
                b_acc += tl.dot(b_aim, b_xmj, input_precision="ieee")
            b_xij = -tl.dot(b_x, b_acc, input_precision="ieee")
            tl.store(Ai + base + rows[:, None] * H * BT + (j * BC + o_r)[None, :], b_xij,
                     mask=m_rows[:, None])
        # zeros above the diagonal blocks, so Ai is a whole [BT, BT] lower-triangular matrix
        for j in tl.static_range(i + 1, NB):
            tl.store(Ai + base + rows[:, None] * H * BT + (j * BC + o_r)[None, :],
                     tl.zeros([BC, BC], dtype=tl.float32), mask=m_rows[:, None])
        tl.debug_barrier()  # block row i of Ai is read by the later block rows


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
                                       num_warps=4)
    return Ai
