"""The WY / UT transform of the delta rule's chunked form (docs/operators.md section 1), and its backward.

Within a chunk of BT tokens (rows i, j), with diag(beta) K K^T strictly below the diagonal

    A  = tril(diag(beta) K K^T, -1)              # kkt_fwd
    Ai = (I + A)^{-1}                            # kernels.common.solve_tril
    w  = Ai diag(beta) K,   u = Ai diag(beta) V  # recompute_w_u_fwd

(One kernel doing all three with the inverse in registers measured 2.9 ms against 1.5 ms for
the three at T=32768 on an H100: reports/delta_rule.md, FUSED_WY_FWD.)

so that the chunk's v'_t stack to ``u - w S_0`` (S_0: the state entering the chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.solve_tril import inv_unit_lower
from kernels.common.utils import (CHUNK_CONFIGS, chunk_bounds, chunk_rows, dot_precision, dot_split,
                                   finite_part, first_bad_row, load_rows, nonfinite_safe, poison_rows,
                                   store_rows, tile, tuning)

__all__ = ["wy_fwd", "kkt_fwd", "recompute_w_u_fwd", "wy_bwd"]


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def kkt_fwd_kernel(
    k, beta, A, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """A[i, j] = beta_i <k_i, k_j> for j < i within the chunk (zero elsewhere)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    b_beta = tl.load(beta + row0 + o_c * H, mask=m_t, other=0.).to(tl.float32)
    # [BT, BT]
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        # [BT, BK]
        b_k = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :],
                      mask=m_t[:, None] & (o_k < K)[None, :], other=0.)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    o_c = tl.arange(0, BT)
    b_A = tl.where(o_c[:, None] > o_c[None, :], b_A * b_beta[:, None], 0.)
    tl.store(A + row0 * BT + o_c[:, None] * (H * BT) + o_c[None, :], b_A, mask=m_t[:, None])


@triton.jit
def _ai_dot(b_Ai, b_x, PRECISION: tl.constexpr, SPLIT_AI: tl.constexpr):
    """Ai @ x: Ai float32 as hi + lo (two products) when SPLIT_AI, else Ai already rounded to
    x's dtype (one product)."""
    # if/else, not an early return: the compiler (unlike the interpreter) also builds the
    # statements after a return inside a constexpr if, and tl.dot(float32, bf16) does not type.
    if SPLIT_AI:
        b_y = dot_split(b_Ai, b_x, PRECISION)
    else:
        b_y = tl.dot(b_Ai, b_x, input_precision=PRECISION)
    return b_y


@triton.jit
def _store_w_u(k, v, w, u, b_Ai, b_beta, row0, m_t, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               PRECISION: tl.constexpr, SPLIT_AI: tl.constexpr):
    """w = Ai diag(beta) K and u = Ai diag(beta) V for one chunk, Ai [BT, BT] float32: kept to
    ~16 bits (hi + lo, two products) when SPLIT_AI, else rounded to the inputs' dtype."""
    DT = k.dtype.element_ty
    o_c = tl.arange(0, BT)
    if not SPLIT_AI:
        b_Ai = b_Ai.to(DT)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m, other=0.)
        b_w = _ai_dot(b_Ai, (b_k * b_beta[:, None]).to(DT), PRECISION, SPLIT_AI)
        tl.store(w + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m, other=0.)
        b_u = _ai_dot(b_Ai, (b_v * b_beta[:, None]).to(DT), PRECISION, SPLIT_AI)
        tl.store(u + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.autotune(configs=CHUNK_CONFIGS, key=['H', 'K', 'V', 'BT', 'IS_VARLEN'])
@triton.jit(do_not_specialize=['T'])
def recompute_w_u_fwd_kernel(
    k, v, beta, Ai, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, SPLIT_AI: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """w = Ai diag(beta) K and u = Ai diag(beta) V for one chunk."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    # [BT, BT]
    b_Ai = tl.load(Ai + row0 * BT + o_c[:, None] * (H * BT) + o_c[None, :], mask=m_t[:, None], other=0.)
    b_beta = tl.load(beta + row0 + o_c * H, mask=m_t, other=0.).to(tl.float32)
    _store_w_u(k, v, w, u, b_Ai, b_beta, row0, m_t, H, K, V, BT, BK, BV, PRECISION, SPLIT_AI)


# The fused forward below tiles a chunk into 4 x 16 rows (blocks i, j); BT is fixed at 64.
WY_BC = 16
WY_CONFIGS = tuning([triton.Config({}, num_warps=w) for w in (4, 2)])  # 1 warp spills


@triton.jit
def _rows(bos, eos, i_t, i_h, i: tl.constexpr, H: tl.constexpr, BT: tl.constexpr,
          BC: tl.constexpr):
    """(m, row) of block row i (BC tokens) of chunk i_t: which rows hold tokens, and the row
    (int64, of the [B*T*H] rows) of its first token (offsets within stay int32)."""
    o_t = i_t * BT + i * BC + tl.arange(0, BC)
    return o_t < eos - bos, (bos + i_t * BT + i * BC) * H + i_h


@triton.jit
def _store_ai_row(Ai, row, m, x0, x1, x2, x3, i: tl.constexpr, first, H: tl.constexpr,
                  BT: tl.constexpr, BC: tl.constexpr, SAFE: tl.constexpr):
    """Block row i of Ai [BT, BT] (row-major per token, like A); NaN from chunk row ``first``
    on (the first with a non-finite k or beta)."""
    o_r = tl.arange(0, BC)
    p = Ai + row * BT + o_r[:, None] * (H * BT) + o_r[None, :]
    if SAFE:
        bad = (i * BC + o_r)[:, None] >= first
        x0, x1 = tl.where(bad, float("nan"), x0), tl.where(bad, float("nan"), x1)
        x2, x3 = tl.where(bad, float("nan"), x2), tl.where(bad, float("nan"), x3)
    tl.store(p, x0, mask=m[:, None])
    tl.store(p + BC, x1, mask=m[:, None])
    tl.store(p + 2 * BC, x2, mask=m[:, None])
    tl.store(p + 3 * BC, x3, mask=m[:, None])


@triton.jit
def _load_finite(x, o_r, m, o_d, i: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
                 BC: tl.constexpr, SAFE: tl.constexpr):
    """Block row i of x [BC, BD] through utils.finite_part, and per column the first chunk row
    with a non-finite element (BT = 4 BC if none)."""
    b_x, b_bad = finite_part(load_rows(x, o_r, m, o_d, D, H), SAFE)
    return b_x, first_bad_row(b_bad, i * BC + o_r, 4 * BC)


@triton.jit
def _apply_wy(x, y, b0, b1, b2, b3, r0, r1, r2, r3, m0, m1, m2, m3,
              x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, first,
              H: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
              PRECISION: tl.constexpr, SAFE: tl.constexpr):
    """y_i = sum_{j <= i} Ai_ij diag(beta_j) x_j for the four block rows (x: k or v, [.., D]);
    NaN from chunk row ``first`` on, and in a column from its first non-finite x on."""
    DT = x.dtype.element_ty
    o_r = tl.arange(0, BC)
    for i_d in range(tl.cdiv(D, BD)):
        o_d = i_d * BD + tl.arange(0, BD)
        # [BC, BD] each: diag(beta_j) x_j in the inputs' dtype
        x0, f0 = _load_finite(x + r0 * D, o_r, m0, o_d, 0, D, H, BC, SAFE)
        x1, f1 = _load_finite(x + r1 * D, o_r, m1, o_d, 1, D, H, BC, SAFE)
        x2, f2 = _load_finite(x + r2 * D, o_r, m2, o_d, 2, D, H, BC, SAFE)
        x3, f3 = _load_finite(x + r3 * D, o_r, m3, o_d, 3, D, H, BC, SAFE)
        f = tl.minimum(tl.minimum(tl.minimum(f0, f1), tl.minimum(f2, f3)), first)
        xb0, xb1 = (x0 * b0[:, None]).to(DT), (x1 * b1[:, None]).to(DT)
        xb2, xb3 = (x2 * b2[:, None]).to(DT), (x3 * b3[:, None]).to(DT)
        y0 = dot_split(x00, xb0, PRECISION)
        y1 = dot_split(x10, xb0, PRECISION) + dot_split(x11, xb1, PRECISION)
        y2 = dot_split(x20, xb0, PRECISION) + dot_split(x21, xb1, PRECISION) + dot_split(x22, xb2, PRECISION)
        y3 = (dot_split(x30, xb0, PRECISION) + dot_split(x31, xb1, PRECISION)
              + dot_split(x32, xb2, PRECISION) + dot_split(x33, xb3, PRECISION))
        store_rows(y + r0 * D, poison_rows(y0, o_r, f, SAFE), o_r, m0, o_d, D, H)
        store_rows(y + r1 * D, poison_rows(y1, BC + o_r, f, SAFE), o_r, m1, o_d, D, H)
        store_rows(y + r2 * D, poison_rows(y2, 2 * BC + o_r, f, SAFE), o_r, m2, o_d, D, H)
        store_rows(y + r3 * D, poison_rows(y3, 3 * BC + o_r, f, SAFE), o_r, m3, o_d, D, H)


@triton.jit
def _load_beta(beta, r, m, o_r, i: tl.constexpr, H: tl.constexpr, BC: tl.constexpr,
               SAFE: tl.constexpr):
    """beta of block row i through utils.finite_part, and the first chunk row with a
    non-finite one (4 BC if none)."""
    b, bad = finite_part(tl.load(beta + r + o_r * H, mask=m, other=0.).to(tl.float32), SAFE)
    return b, tl.min(tl.where(bad, i * BC + o_r, 4 * BC), 0)


@triton.jit
def _kkt_blocks(k, r0, r1, r2, r3, m0, m1, m2, m3, H: tl.constexpr, K: tl.constexpr,
                BC: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, SAFE: tl.constexpr):
    """K_i K_j^T for the ten blocks j <= i ([BC, BC] float32 each), from k read through
    utils.finite_part, and the first chunk row with a non-finite k (4 BC if none)."""
    o_r = tl.arange(0, BC)
    a00 = tl.zeros([BC, BC], dtype=tl.float32)
    a10 = tl.zeros([BC, BC], dtype=tl.float32)
    a11 = tl.zeros([BC, BC], dtype=tl.float32)
    a20 = tl.zeros([BC, BC], dtype=tl.float32)
    a21 = tl.zeros([BC, BC], dtype=tl.float32)
    a22 = tl.zeros([BC, BC], dtype=tl.float32)
    a30 = tl.zeros([BC, BC], dtype=tl.float32)
    a31 = tl.zeros([BC, BC], dtype=tl.float32)
    a32 = tl.zeros([BC, BC], dtype=tl.float32)
    a33 = tl.zeros([BC, BC], dtype=tl.float32)
    first = tl.full((), 4 * BC, tl.int32)  # the loop lowers it
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        # [BC, BK]
        k0, f0 = _load_finite(k + r0 * K, o_r, m0, o_k, 0, K, H, BC, SAFE)
        k1, f1 = _load_finite(k + r1 * K, o_r, m1, o_k, 1, K, H, BC, SAFE)
        k2, f2 = _load_finite(k + r2 * K, o_r, m2, o_k, 2, K, H, BC, SAFE)
        k3, f3 = _load_finite(k + r3 * K, o_r, m3, o_k, 3, K, H, BC, SAFE)
        if SAFE:
            first = tl.minimum(first, tl.min(tl.minimum(tl.minimum(f0, f1), tl.minimum(f2, f3)), 0))
        kt0, kt1, kt2, kt3 = tl.trans(k0), tl.trans(k1), tl.trans(k2), tl.trans(k3)
        a00 += tl.dot(k0, kt0, input_precision=PRECISION)
        a10 += tl.dot(k1, kt0, input_precision=PRECISION)
        a11 += tl.dot(k1, kt1, input_precision=PRECISION)
        a20 += tl.dot(k2, kt0, input_precision=PRECISION)
        a21 += tl.dot(k2, kt1, input_precision=PRECISION)
        a22 += tl.dot(k2, kt2, input_precision=PRECISION)
        a30 += tl.dot(k3, kt0, input_precision=PRECISION)
        a31 += tl.dot(k3, kt1, input_precision=PRECISION)
        a32 += tl.dot(k3, kt2, input_precision=PRECISION)
        a33 += tl.dot(k3, kt3, input_precision=PRECISION)
    return a00, a10, a11, a20, a21, a22, a30, a31, a32, a33, first


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.autotune(configs=WY_CONFIGS, key=['H', 'K', 'V'])
@triton.jit(do_not_specialize=['T'])
def wy_fwd_kernel(
    k, v, beta, Ai, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, SAFE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The whole WY transform of one chunk with every block in registers (BT = 4 BC rows;
    i, j index BC x BC blocks):

        A_ij = diag(beta_i) K_i K_j^T              (j < i; strictly lower part for j == i)
        X_ii = (I + A_ii)^{-1}                      # row by row, common.solve_tril
        X_ij = -X_ii sum_{j <= m < i} A_im X_mj     # block substitution, as solve_tril
        w_i  = sum_{j <= i} X_ij diag(beta_j) K_j,  u_i likewise with V

    X = Ai = (I + A)^{-1} is stored in float32 for the backward. A never leaves registers.
    Non-finite k, v, beta are read as 0 and their rows on made NaN (utils.finite_part): the
    products would otherwise carry them to the chunk's earlier rows; SAFE, see there."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_bh // H, T, BT, IS_VARLEN)
    m0, r0 = _rows(bos, eos, i_t, i_h, 0, H, BT, BC)
    m1, r1 = _rows(bos, eos, i_t, i_h, 1, H, BT, BC)
    m2, r2 = _rows(bos, eos, i_t, i_h, 2, H, BT, BC)
    m3, r3 = _rows(bos, eos, i_t, i_h, 3, H, BT, BC)
    o_r = tl.arange(0, BC)
    b0, f0 = _load_beta(beta, r0, m0, o_r, 0, H, BC, SAFE)
    b1, f1 = _load_beta(beta, r1, m1, o_r, 1, H, BC, SAFE)
    b2, f2 = _load_beta(beta, r2, m2, o_r, 2, H, BC, SAFE)
    b3, f3 = _load_beta(beta, r3, m3, o_r, 3, H, BC, SAFE)
    a00, a10, a11, a20, a21, a22, a30, a31, a32, a33, first = _kkt_blocks(
        k, r0, r1, r2, r3, m0, m1, m2, m3, H, K, BC, BK, PRECISION, SAFE)
    # the first chunk row with a non-finite k or beta (BT if none)
    first = tl.minimum(first, tl.minimum(tl.minimum(f0, f1), tl.minimum(f2, f3)))

    strict = o_r[:, None] > o_r[None, :]
    x00 = inv_unit_lower(tl.where(strict, a00 * b0[:, None], 0.), BC)
    x11 = inv_unit_lower(tl.where(strict, a11 * b1[:, None], 0.), BC)
    x22 = inv_unit_lower(tl.where(strict, a22 * b2[:, None], 0.), BC)
    x33 = inv_unit_lower(tl.where(strict, a33 * b3[:, None], 0.), BC)
    a10, a20, a21 = a10 * b1[:, None], a20 * b2[:, None], a21 * b2[:, None]
    a30, a31, a32 = a30 * b3[:, None], a31 * b3[:, None], a32 * b3[:, None]
    # X_ij = -X_ii sum_{j <= m < i} A_im X_mj, exact float32 products
    x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision="ieee"), input_precision="ieee")
    x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision="ieee"), input_precision="ieee")
    x20 = -tl.dot(x22, tl.dot(a20, x00, input_precision="ieee")
                  + tl.dot(a21, x10, input_precision="ieee"), input_precision="ieee")
    x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision="ieee"), input_precision="ieee")
    x31 = -tl.dot(x33, tl.dot(a31, x11, input_precision="ieee")
                  + tl.dot(a32, x21, input_precision="ieee"), input_precision="ieee")
    x30 = -tl.dot(x33, tl.dot(a30, x00, input_precision="ieee") + tl.dot(a31, x10, input_precision="ieee")
                  + tl.dot(a32, x20, input_precision="ieee"), input_precision="ieee")
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    _store_ai_row(Ai, r0, m0, x00, zero, zero, zero, 0, first, H, BT, BC, SAFE)
    _store_ai_row(Ai, r1, m1, x10, x11, zero, zero, 1, first, H, BT, BC, SAFE)
    _store_ai_row(Ai, r2, m2, x20, x21, x22, zero, 2, first, H, BT, BC, SAFE)
    _store_ai_row(Ai, r3, m3, x30, x31, x32, x33, 3, first, H, BT, BC, SAFE)
    _apply_wy(k, w, b0, b1, b2, b3, r0, r1, r2, r3, m0, m1, m2, m3,
              x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, first, H, K, BC, BK, PRECISION,
              SAFE)
    _apply_wy(v, u, b0, b1, b2, b3, r0, r1, r2, r3, m0, m1, m2, m3,
              x00, x10, x11, x20, x21, x22, x30, x31, x32, x33, first, H, V, BC, BV, PRECISION,
              SAFE)


def wy_fwd(k, v, beta, cu_seqlens, chunk_indices, NT: int, BT: int):
    """(Ai [B,T,H,BT] float32, w [B,T,H,K] in k's dtype, u [B,T,H,V] float32), one pass."""
    if BT != 4 * WY_BC:
        raise ValueError(f"wy_fwd: the chunk size must be {4 * WY_BC}, got {BT}")
    B, T, H, K = k.shape
    V = v.shape[-1]
    Ai = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)
    w, u = torch.empty_like(k), torch.empty_like(v, dtype=torch.float32)
    BK, BV = tile(K), tile(V)
    if NT:
        wy_fwd_kernel[(NT, B * H)](k, v, beta, Ai, w, u, cu_seqlens, chunk_indices, T, H=H, K=K,
                                   V=V, BT=BT, BC=WY_BC, BK=BK, BV=BV,
                                   PRECISION=dot_precision(k.dtype), SAFE=nonfinite_safe())
    return Ai, w, u


def kkt_fwd(k: torch.Tensor, beta: torch.Tensor, cu_seqlens, chunk_indices, NT: int,
            BT: int) -> torch.Tensor:
    """A [B, T, H, BT] float32: tril(diag(beta) K K^T, -1) per chunk."""
    B, T, H, K = k.shape
    A = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)
    BK = tile(K)
    if NT:
        kkt_fwd_kernel[(NT, B * H)](k, beta, A, cu_seqlens, chunk_indices, T, H=H, K=K, BT=BT,
                                    BK=BK, PRECISION=dot_precision(k.dtype))
    return A


def recompute_w_u_fwd(k, v, beta, Ai, cu_seqlens, chunk_indices, NT: int, BT: int,
                      in_inputs_dtype: bool = False):
    """(w [B,T,H,K] in k's dtype, u [B,T,H,V] float32). ``in_inputs_dtype``: u in v's dtype
    and Ai rounded to it (one product each instead of a hi + lo pair)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    w = torch.empty_like(k)
    u = torch.empty_like(v, dtype=v.dtype if in_inputs_dtype else torch.float32)
    BK, BV = tile(K), tile(V)
    if NT:
        recompute_w_u_fwd_kernel[(NT, B * H)](
            k, v, beta, Ai, w, u, cu_seqlens, chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK,
            BV=BV, PRECISION=dot_precision(k.dtype), SPLIT_AI=not in_inputs_dtype)
    return w, u


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.autotune(configs=CHUNK_CONFIGS, key=['H', 'K', 'V', 'BT', 'IS_VARLEN'])
@triton.jit(do_not_specialize=['T'])
def wy_bwd_kernel(
    k, v, beta, Ai, dw, du, dk_in, dk, dv, dbeta, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Back through w = Ai diag(beta) K, u = Ai diag(beta) V, Ai = (I + A)^{-1} and
    A = tril(diag(beta) K K^T, -1), for one chunk:

        dAi      = dw (diag(beta) K)^T + du (diag(beta) V)^T
        dA       = -tril(Ai^T dAi Ai^T, -1)
        dk       = dk_in + diag(beta) Ai^T dw + diag(beta) dA K + dA^T diag(beta) K
        dv       = diag(beta) Ai^T du
        dbeta    = rowsum(Ai^T dw * K) + rowsum(Ai^T du * V) + rowsum((dA K) * K)

    dk_in holds the other paths' share of dk (float32 or the inputs' dtype); dk, dv, dbeta
    are written final.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    DT = k.dtype.element_ty
    # [BT, BT]
    b_Ai = tl.load(Ai + row0 * BT + o_c[:, None] * (H * BT) + o_c[None, :], mask=m_t[:, None], other=0.)
    b_Ait = tl.trans(b_Ai).to(DT)
    b_beta = tl.load(beta + row0 + o_c * H, mask=m_t, other=0.).to(tl.float32)
    b_dAi = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m, other=0.)
        b_du = tl.load(du + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m, other=0.).to(DT)
        b_dAi += tl.dot(b_du, tl.trans((b_v * b_beta[:, None]).to(DT)), input_precision=PRECISION)
        b_dvb = tl.dot(b_Ait, b_du, input_precision=PRECISION)  # d(diag(beta) V)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        store_rows(dv + row0 * V, b_dvb * b_beta[:, None], o_c, m_t, o_v, V, H)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m, other=0.)
        b_dw = tl.load(dw + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m, other=0.).to(DT)
        b_dAi += tl.dot(b_dw, tl.trans((b_k * b_beta[:, None]).to(DT)), input_precision=PRECISION)
    # dA = -(Ai^T dAi Ai^T), strictly below the diagonal
    b_dA = tl.dot(tl.dot(b_Ait, b_dAi.to(DT), input_precision=PRECISION).to(DT), b_Ait,
                  input_precision=PRECISION)
    b_dA = tl.where(o_c[:, None] > o_c[None, :], -b_dA, 0.)
    # rowsum(dA * K K^T) is taken as rowsum((dA K) * K), per block of K below, from the same
    # product that dk needs. (Summed from a K K^T accumulator instead, the H100 gave dbeta 2e-2
    # off at K = V = 128, 4 or 8 warps, the same kernel's dv and dk right; fla: 3.9e-3.)
    b_dAbt = tl.trans((b_dA * b_beta[:, None]).to(DT))  # (diag(beta) dA)^T
    b_dA = b_dA.to(DT)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m, other=0.)
        b_dw = tl.load(dw + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m, other=0.).to(DT)
        b_dkb = tl.dot(b_Ait, b_dw, input_precision=PRECISION)  # d(diag(beta) K)
        b_dbeta += tl.sum(b_dkb * b_k, 1)
        b_dAk = tl.dot(b_dA, b_k, input_precision=PRECISION)  # dA K
        b_dbeta += tl.sum(b_dAk * b_k, 1)
        b_dk = tl.load(dk_in + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m,
                       other=0.).to(tl.float32)
        b_dk += (b_dkb + b_dAk) * b_beta[:, None]
        b_dk += tl.dot(b_dAbt, b_k, input_precision=PRECISION)
        tl.store(dk + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m)
    tl.store(dbeta + row0 + o_c * H, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


def wy_bwd(k, v, beta, Ai, dw, du, dk_in, cu_seqlens, chunk_indices, NT: int, BT: int,
           grad_dtype: torch.dtype | None = None):
    """(dk, dv, dbeta): dk = dk_in (the other paths' share, any float dtype) plus the WY path's.
    dk comes back in ``grad_dtype`` (default k's), dv in v's, dbeta in beta's."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dk = torch.empty_like(k, dtype=grad_dtype or k.dtype)
    dv, dbeta = torch.empty_like(v), torch.empty_like(beta)
    BK, BV = tile(K), tile(V)
    if NT:
        wy_bwd_kernel[(NT, B * H)](k, v, beta, Ai, dw, du, dk_in, dk, dv, dbeta, cu_seqlens,
                                   chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                   PRECISION=dot_precision(k.dtype))
    return dk, dv, dbeta
