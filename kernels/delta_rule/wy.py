"""The WY / UT transform of the delta rule's chunked form (OPERATORS.md section 1), and its backward.

Within a chunk of BT tokens (rows i, j), with diag(beta) K K^T strictly below the diagonal

    A  = tril(diag(beta) K K^T, -1)              # kkt_fwd
    Ai = (I + A)^{-1}                            # kernels.common.solve_tril
    w  = Ai diag(beta) K,   u = Ai diag(beta) V  # recompute_w_u_fwd

(One kernel doing all three with the inverse in registers measured 2.9 ms against 1.5 ms for
the three at T=32768 on an H100: reports/NOTES.md.)

so that the chunk's v'_t stack to ``u - w S_0`` (S_0: the state entering the chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import chunk_rows, dot_precision, dot_split

__all__ = ["kkt_fwd", "recompute_w_u_fwd", "wy_bwd"]


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def kkt_fwd_kernel(
    k, beta, A, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """A[i, j] = beta_i <k_i, k_j> for j < i within the chunk (zero elsewhere)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, o_row = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    b_beta = tl.load(beta + o_row, mask=m_t, other=0.).to(tl.float32)
    # [BT, BT]
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        # [BT, BK]
        b_k = tl.load(k + o_row[:, None] * K + o_k[None, :],
                      mask=m_t[:, None] & (o_k < K)[None, :], other=0.)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    o_c = tl.arange(0, BT)
    b_A = tl.where(o_c[:, None] > o_c[None, :], b_A * b_beta[:, None], 0.)
    tl.store(A + o_row[:, None] * BT + o_c[None, :], b_A, mask=m_t[:, None])


@triton.jit
def _store_w_u(k, v, w, u, b_Ai, b_beta, o_row, m_t, K: tl.constexpr, V: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """w = Ai diag(beta) K and u = Ai diag(beta) V for one chunk, Ai [BT, BT] float32."""
    DT = k.dtype.element_ty
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m, other=0.)
        b_w = dot_split(b_Ai, (b_k * b_beta[:, None]).to(DT), PRECISION)
        tl.store(w + o_row[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + o_row[:, None] * V + o_v[None, :], mask=m, other=0.)
        b_u = dot_split(b_Ai, (b_v * b_beta[:, None]).to(DT), PRECISION)
        tl.store(u + o_row[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def recompute_w_u_fwd_kernel(
    k, v, beta, Ai, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """w = Ai diag(beta) K and u = Ai diag(beta) V for one chunk."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, o_row = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    # [BT, BT]
    b_Ai = tl.load(Ai + o_row[:, None] * BT + o_c[None, :], mask=m_t[:, None], other=0.)
    b_beta = tl.load(beta + o_row, mask=m_t, other=0.).to(tl.float32)
    _store_w_u(k, v, w, u, b_Ai, b_beta, o_row, m_t, K, V, BK, BV, PRECISION)


def kkt_fwd(k: torch.Tensor, beta: torch.Tensor, cu_seqlens, chunk_indices, NT: int,
            BT: int) -> torch.Tensor:
    """A [B, T, H, BT] float32: tril(diag(beta) K K^T, -1) per chunk."""
    B, T, H, K = k.shape
    A = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)
    BK = min(64, triton.next_power_of_2(K))
    if NT:
        kkt_fwd_kernel[(NT, B * H)](k, beta, A, cu_seqlens, chunk_indices, T, H=H, K=K, BT=BT,
                                    BK=BK, PRECISION=dot_precision(k.dtype), num_warps=4)
    return A


def recompute_w_u_fwd(k, v, beta, Ai, cu_seqlens, chunk_indices, NT: int, BT: int):
    """(w [B,T,H,K], u [B,T,H,V]) in the dtypes of k and v."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    w, u = torch.empty_like(k), torch.empty_like(v)
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    if NT:
        recompute_w_u_fwd_kernel[(NT, B * H)](
            k, v, beta, Ai, w, u, cu_seqlens, chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK,
            BV=BV, PRECISION=dot_precision(k.dtype), num_warps=4)
    return w, u


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
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
        dbeta    = rowsum(Ai^T dw * K) + rowsum(Ai^T du * V) + rowsum(dA * K K^T)

    dk_in holds the other paths' share of dk (float32); dk, dv, dbeta are written final.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, o_row = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    DT = k.dtype.element_ty
    # [BT, BT]
    b_Ai = tl.load(Ai + o_row[:, None] * BT + o_c[None, :], mask=m_t[:, None], other=0.)
    b_Ait = tl.trans(b_Ai).to(DT)
    b_beta = tl.load(beta + o_row, mask=m_t, other=0.).to(tl.float32)
    b_dAi = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + o_row[:, None] * V + o_v[None, :], mask=m, other=0.)
        b_du = tl.load(du + o_row[:, None] * V + o_v[None, :], mask=m, other=0.).to(DT)
        b_dAi += tl.dot(b_du, tl.trans((b_v * b_beta[:, None]).to(DT)), input_precision=PRECISION)
        b_dvb = tl.dot(b_Ait, b_du, input_precision=PRECISION)  # d(diag(beta) V)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        tl.store(dv + o_row[:, None] * V + o_v[None, :], (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m, other=0.)
        b_dw = tl.load(dw + o_row[:, None] * K + o_k[None, :], mask=m, other=0.).to(DT)
        b_dAi += tl.dot(b_dw, tl.trans((b_k * b_beta[:, None]).to(DT)), input_precision=PRECISION)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    # dA = -(Ai^T dAi Ai^T), strictly below the diagonal
    b_dA = tl.dot(tl.dot(b_Ait, b_dAi.to(DT), input_precision=PRECISION).to(DT), b_Ait,
                  input_precision=PRECISION)
    b_dA = tl.where(o_c[:, None] > o_c[None, :], -b_dA, 0.)
    b_dbeta += tl.sum(b_dA * b_kk, 1)
    b_dAb = (b_dA * b_beta[:, None]).to(DT)  # diag(beta) dA
    b_dAbt = tl.trans(b_dAb)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m, other=0.)
        b_dw = tl.load(dw + o_row[:, None] * K + o_k[None, :], mask=m, other=0.).to(DT)
        b_dkb = tl.dot(b_Ait, b_dw, input_precision=PRECISION)  # d(diag(beta) K)
        b_dbeta += tl.sum(b_dkb * b_k, 1)
        b_dk = tl.load(dk_in + o_row[:, None] * K + o_k[None, :], mask=m, other=0.)
        b_dk += b_dkb * b_beta[:, None]
        b_dk += tl.dot(b_dAb, b_k, input_precision=PRECISION) + tl.dot(b_dAbt, b_k, input_precision=PRECISION)
        tl.store(dk + o_row[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m)
    tl.store(dbeta + o_row, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


def wy_bwd(k, v, beta, Ai, dw, du, dk_in, cu_seqlens, chunk_indices, NT: int, BT: int,
           grad_dtype: torch.dtype | None = None):
    """(dk, dv, dbeta): dk = dk_in (float32, the other paths' share) plus the WY path's.
    dk comes back in ``grad_dtype`` (default k's), dv in v's, dbeta in beta's."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dk = torch.empty_like(k, dtype=grad_dtype or k.dtype)
    dv, dbeta = torch.empty_like(v), torch.empty_like(beta)
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    if NT:
        wy_bwd_kernel[(NT, B * H)](k, v, beta, Ai, dw, du, dk_in, dk, dv, dbeta, cu_seqlens,
                                   chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                   PRECISION=dot_precision(k.dtype), num_warps=4)
    return dk, dv, dbeta
