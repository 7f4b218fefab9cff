"""Chunked output assembly and its backward: each chunk reads the state entering it and its own tokens.

For a chunk with entering state h[n] and values v' (for the delta rule, the v'_t of
docs/operators.md section 1; for plain linear attention, v):

    O = (scale Q) h[n] + tril((scale Q) K^T) v'

and, for GLA (section 2; kernels/gla/chunk.py forms A with the gates, and Q * exp(b) with b the
cumulative log key gate within the chunk, which it passes as Q), O = scale (Q * exp(b)) h[n] + A v.

One program per (value tile, chunk, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import (CHUNK_CONFIGS, chunk_index, chunk_rows, dot_precision,
                                   finite_part, first_bad_row, load_cols, load_rows,
                                   nonfinite_safe, poison_rows, store_rows, tile)

__all__ = ["chunk_fwd_o", "chunk_bwd_dv_local", "chunk_bwd_dqk"]


@triton.heuristics({
    'USE_A': lambda a: a['A'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=CHUNK_CONFIGS, key=['H', 'K', 'V', 'BT', 'USE_A', 'IS_VARLEN'])
@triton.jit(do_not_specialize=['T'])
def chunk_fwd_o_kernel(
    q, k, v, h, o, A, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, SAFE: tl.constexpr,
    USE_A: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """O = scale (Q h[n] + tril(Q K^T) v') for one chunk and value tile, h[n] rounded to Q's
    dtype. With A given (USE_A: the chunk's intra-chunk matrix, scale and gates included, as
    GLA's kernels/gla/chunk.py forms it) A V takes tril(Q K^T) v''s place."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    i_chunk = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN)
    p_h = h + (i_chunk * H + i_bh % H) * K * V
    o_c = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    if not USE_A:
        b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        # [BT, BK], [BK, BT], [BK, BV]
        b_q = load_rows(q + row0 * K, o_c, m_t, o_k, K, H)
        if not USE_A:
            b_kt = load_cols(k + row0 * K, o_c, m_t, o_k, K, H)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k < K)[:, None] & m_v[None, :],
                      other=0.)
        b_o += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PRECISION)
        if not USE_A:
            b_A += tl.dot(b_q, b_kt, input_precision=PRECISION)
    if USE_A:
        b_A = load_rows(A + row0 * BT, o_c, m_t, o_c, BT, H)
    else:
        b_A = tl.where(o_c[:, None] >= o_c[None, :], b_A, 0.)
    # [BT, BV]
    # (a non-finite v' row reaches the rows after it only: utils.finite_part)
    b_v, b_bad = finite_part(load_rows(v + row0 * V, o_c, m_t, o_v, V, H), SAFE)
    if USE_A:
        b_o = b_o * scale + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PRECISION)
    else:
        b_o = (b_o + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PRECISION)) * scale
    b_o = poison_rows(b_o, o_c, first_bad_row(b_bad, o_c, BT), SAFE)
    store_rows(o + row0 * V, b_o, o_c, m_t, o_v, V, H)


def chunk_fwd_o(q, k, v, h, scale: float, cu_seqlens, chunk_indices, NT: int, BT: int,
                out_dtype: torch.dtype | None = None, A: torch.Tensor | None = None,
                safe: bool | None = None) -> torch.Tensor:
    """O per chunk (chunk_fwd_o_kernel), [B, T, H, V] in ``out_dtype`` (default v's). ``A``,
    the intra-chunk matrix ([B, T, H, BT], any dtype: its product rounds it to v's), replaces
    tril(Q K^T) (GLA, which passes Q * exp(b) as q); ``safe`` defaults to
    utils.NONFINITE_SAFE."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(B, T, H, V, dtype=out_dtype or v.dtype, device=v.device)
    BK, BV = tile(K), tile(V)
    if NT:
        grid = (triton.cdiv(V, BV), NT, B * H)
        chunk_fwd_o_kernel[grid](q, k, v, h, o, A, cu_seqlens, chunk_indices, scale, T, H=H,
                                 K=K, V=V, BT=BT, BK=BK, BV=BV, PRECISION=dot_precision(q.dtype),
                                 SAFE=nonfinite_safe() if safe is None else safe)
    return o


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.autotune(configs=CHUNK_CONFIGS, key=['H', 'K', 'V', 'BT', 'IS_VARLEN'])
@triton.jit(do_not_specialize=['T'])
def chunk_bwd_dv_local_kernel(
    q, k, do, dv, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The in-chunk part of dv': tril((scale Q) K^T)^T dO."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    # [BT, BT]: row j (key), column i (query)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_rows(k + row0 * K, o_c, m_t, o_k, K, H)
        b_qt = load_cols(q + row0 * K, o_c, m_t, o_k, K, H)
        b_At += tl.dot(b_k, b_qt, input_precision=PRECISION)
    b_At = tl.where(o_c[:, None] <= o_c[None, :], b_At * scale, 0.)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_do = load_rows(do + row0 * V, o_c, m_t, o_v, V, H)
        b_dv = tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PRECISION)
        store_rows(dv + row0 * V, b_dv, o_c, m_t, o_v, V, H)


@triton.heuristics({
    'USE_W': lambda a: a['dw'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=CHUNK_CONFIGS, key=['H', 'K', 'V', 'BT', 'USE_W', 'IS_VARLEN'])
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
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BT, IS_VARLEN)
    i_chunk = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN)
    p_h = (i_chunk * H + i_bh % H) * K * V
    o_c = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        # [BT, BV]
        b_v = load_rows(v + row0 * V, o_c, m_t, o_v, V, H)
        b_do = load_rows(do + row0 * V, o_c, m_t, o_v, V, H)
        # [BV, BK]: the states transposed, loaded as such
        m_vk = (o_v < V)[:, None] & m_k[None, :]
        b_ht = tl.load(h + p_h + o_v[:, None] + o_k[None, :] * V, mask=m_vk, other=0.)
        b_dht = tl.load(dh + p_h + o_v[:, None] + o_k[None, :] * V, mask=m_vk, other=0.)
        b_dq += tl.dot(b_do, b_ht, input_precision=PRECISION)
        b_dk += tl.dot(b_v, b_dht, input_precision=PRECISION)
        b_ds += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        if USE_W:
            b_dv = load_rows(dv + row0 * V, o_c, m_t, o_v, V, H)
            b_dw -= tl.dot(b_dv.to(b_ht.dtype), b_ht, input_precision=PRECISION)
    b_ds = tl.where(o_c[:, None] >= o_c[None, :], b_ds * scale, 0.)
    # [BT, BK]
    b_q = load_rows(q + row0 * K, o_c, m_t, o_k, K, H)
    b_k = load_rows(k + row0 * K, o_c, m_t, o_k, K, H)
    b_dq = b_dq * scale + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
    store_rows(dq + row0 * K, b_dq, o_c, m_t, o_k, K, H)
    store_rows(dk + row0 * K, b_dk, o_c, m_t, o_k, K, H)
    if USE_W:
        store_rows(dw + row0 * K, b_dw, o_c, m_t, o_k, K, H)


def chunk_bwd_dv_local(q, k, do, scale: float, cu_seqlens, chunk_indices, NT: int, BT: int):
    """tril((scale Q) K^T)^T dO per chunk, [B, T, H, V] in dO's dtype (float32 accumulation)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    dv = torch.empty_like(do)
    BK, BV = tile(K), tile(V)
    if NT:
        chunk_bwd_dv_local_kernel[(NT, B * H)](q, k, do, dv, cu_seqlens, chunk_indices, scale, T,
                                               H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                               PRECISION=dot_precision(q.dtype))
    return dv


def chunk_bwd_dqk(q, k, v, h, do, dh, dv, scale: float, cu_seqlens, chunk_indices, NT: int,
                  BT: int, with_w: bool = True, dq_dtype: torch.dtype | None = None,
                  dk_dtype: torch.dtype = torch.float32):
    """(dq in ``dq_dtype`` (default q's), dk in ``dk_dtype``, dw in k's dtype or None),
    [B, T, H, K] each; dk gets more terms later."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dq = torch.empty(B, T, H, K, dtype=dq_dtype or q.dtype, device=q.device)
    dk = torch.empty(B, T, H, K, dtype=dk_dtype, device=q.device)
    dw = torch.empty_like(k) if with_w else None
    BK, BV = tile(K), tile(V)
    if NT:
        grid = (triton.cdiv(K, BK), NT, B * H)
        chunk_bwd_dqk_kernel[grid](q, k, v, h, do, dh, dv, dq, dk, dw, cu_seqlens, chunk_indices,
                                   scale, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                   PRECISION=dot_precision(q.dtype))
    return dq, dk, dw
