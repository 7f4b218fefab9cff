"""Chunked output assembly and its backward: each chunk reads the state entering it and its own tokens.

For a chunk with entering state h[n] and values v' (for the delta rule, the v'_t of
OPERATORS.md section 1; for plain linear attention, v):

    O = (scale Q) h[n] + tril((scale Q) K^T) v'

One program per (value tile, chunk, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import chunk_rows, dot_precision

__all__ = ["chunk_fwd_o", "chunk_bwd_dv_local", "chunk_bwd_dqk"]


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_fwd_o_kernel(
    q, k, v, h, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, m_t, o_row = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    i_chunk = i_c.to(tl.int64) if IS_VARLEN else (i_bh // H).to(tl.int64) * tl.cdiv(T, BT) + i_t
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        # [BT, BK], [BK, BT], [BK, BV]
        b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_kt = tl.trans(tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.))
        b_h = tl.load(h + (i_chunk * H + i_bh % H) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.)
        b_o += tl.dot(b_q, b_h, input_precision=PRECISION)
        b_A += tl.dot(b_q, b_kt, input_precision=PRECISION)
    o_c = tl.arange(0, BT)
    b_A = tl.where(o_c[:, None] >= o_c[None, :], b_A, 0.)
    # [BT, BV]
    b_v = tl.load(v + o_row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
    b_o = (b_o + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PRECISION)) * scale
    tl.store(o + o_row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


def chunk_fwd_o(q, k, v, h, scale: float, cu_seqlens, chunk_indices, NT: int, BT: int,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(B, T, H, V, dtype=out_dtype or v.dtype, device=v.device)
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    if NT:
        grid = (triton.cdiv(V, BV), NT, B * H)
        chunk_fwd_o_kernel[grid](q, k, v, h, o, cu_seqlens, chunk_indices, scale, T, H=H, K=K,
                                 V=V, BT=BT, BK=BK, BV=BV, PRECISION=dot_precision(q.dtype),
                                 num_warps=4)
    return o


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_bwd_dv_local_kernel(
    q, k, do, dv, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The in-chunk part of dv': tril((scale Q) K^T)^T dO."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, o_row = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    # [BT, BT]: row j (key), column i (query)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_qt = tl.trans(tl.load(q + o_row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.))
        b_At += tl.dot(b_k, b_qt, input_precision=PRECISION)
    o_c = tl.arange(0, BT)
    b_At = tl.where(o_c[:, None] <= o_c[None, :], b_At * scale, 0.)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m, other=0.)
        b_dv = tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PRECISION)
        tl.store(dv + o_row[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m)


@triton.heuristics({
    'USE_W': lambda a: a['dw'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_bwd_dqk_kernel(
    q, k, v, h, do, dh, dv, dq, dk, dw, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    USE_W: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """For one chunk, with h = state entering it, dh = d(state leaving it):

        dS    = tril(dO v'^T)                                  [BT, BT], i >= j
        dq    = scale (dO h^T + dS K)
        dk    = v' dh^T + scale dS^T Q                         # S_{n+1} = h + K^T v'
        dw    = -dv' h^T                                       # v' = u - w h (delta rule)
    """
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, m_t, o_row = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    i_chunk = i_c.to(tl.int64) if IS_VARLEN else (i_bh // H).to(tl.int64) * tl.cdiv(T, BT) + i_t
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_h = (i_chunk * H + i_bh % H) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        # [BT, BV]
        b_v = tl.load(v + o_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        # [BV, BK]
        m_kv = m_k[:, None] & m_v[None, :]
        b_ht = tl.trans(tl.load(h + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.))
        b_dht = tl.trans(tl.load(dh + p_h + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.))
        b_dq += tl.dot(b_do, b_ht, input_precision=PRECISION)
        b_dk += tl.dot(b_v, b_dht, input_precision=PRECISION)
        b_ds += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        if USE_W:
            b_dv = tl.load(dv + o_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
            b_dw -= tl.dot(b_dv.to(b_ht.dtype), b_ht, input_precision=PRECISION)
    o_c = tl.arange(0, BT)
    b_ds = tl.where(o_c[:, None] >= o_c[None, :], b_ds * scale, 0.)
    # [BT, BK]
    b_q = tl.load(q + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_k = tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_dq = b_dq * scale + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
    tl.store(dq + o_row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + o_row[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if USE_W:
        tl.store(dw + o_row[:, None] * K + o_k[None, :], b_dw.to(dw.dtype.element_ty), mask=m_tk)


def chunk_bwd_dv_local(q, k, do, scale: float, cu_seqlens, chunk_indices, NT: int, BT: int):
    """tril((scale Q) K^T)^T dO per chunk, [B, T, H, V] in dO's dtype (float32 accumulation)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    dv = torch.empty_like(do)
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    if NT:
        chunk_bwd_dv_local_kernel[(NT, B * H)](q, k, do, dv, cu_seqlens, chunk_indices, scale, T,
                                               H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                               PRECISION=dot_precision(q.dtype), num_warps=4)
    return dv


def chunk_bwd_dqk(q, k, v, h, do, dh, dv, scale: float, cu_seqlens, chunk_indices, NT: int,
                  BT: int, with_w: bool = True, dq_dtype: torch.dtype | None = None):
    """(dq in ``dq_dtype`` (default q's), dk float32, dw in k's dtype or None), [B, T, H, K]
    each; dk gets more terms later."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dq = torch.empty(B, T, H, K, dtype=dq_dtype or q.dtype, device=q.device)
    dk = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dw = torch.empty_like(k) if with_w else None
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    if NT:
        grid = (triton.cdiv(K, BK), NT, B * H)
        chunk_bwd_dqk_kernel[grid](q, k, v, h, do, dh, dv, dq, dk, dw, cu_seqlens, chunk_indices,
                                   scale, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                   PRECISION=dot_precision(q.dtype), num_warps=4)
    return dq, dk, dw
