"""Chunked state passing: the state entering every chunk (forward) and its gradient (backward).

One program per (value tile, sequence, head) walks the chunks of its sequence in order with
the state S [BK, BV] in float32 registers. For the delta rule (OPERATORS.md section 1), with
the WY transform's w, u of each chunk (kernels/delta_rule/wy.py):

    h[n]  = S                       # the state entering chunk n (stored for the output stage)
    v'    = u - w S                 # the chunk's v'_t, stacked            [BT, BV]
    S     = S + K^T v'              # the state leaving the chunk

v' is stored (the output stage reads it). The final S is the final state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import dot_precision, dot_split, seq_bounds, tuning

__all__ = ["chunk_fwd_h", "chunk_bwd_dh"]

MAX_STATE_TILE = 8192  # floats of state per program (BK * BV), 64 registers a thread at 4 warps

# The walk over chunks is sequential, so the grid is only (V / BV) x N x H programs: BV = 32
# doubles them (more SMs busy), BV = 64 halves the re-reads of k and w. Measured per shape.
STATE_CONFIGS = tuning([
    triton.Config({'BV': BV}, num_warps=num_warps, num_stages=num_stages)
    for BV in (32, 64) for num_warps in (4, 8) for num_stages in (2, 3, 4)
])


def _fits(configs, named_args, **kwargs):
    """Drop tiles whose float32 state would not fit in registers."""
    BK = triton.next_power_of_2(named_args['K'] if 'K' in named_args else kwargs['K'])
    fit = [c for c in configs if BK * c.kwargs['BV'] <= MAX_STATE_TILE]
    return fit or [min(configs, key=lambda c: c.kwargs['BV'])]


@triton.jit
def _walk(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, eos, NT, c0) of sequence i_n: its tokens, its chunk count, and the index of its
    first chunk in the per-chunk state tensors."""
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, eos, tl.cdiv(eos - bos, BT), c0


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=STATE_CONFIGS, key=['H', 'K', 'V', 'BT', 'IS_VARLEN'],
                 prune_configs_by={'early_config_prune': _fits})
@triton.jit(do_not_specialize=['T'])
def chunk_fwd_h_kernel(
    k, w, u, v_new, h, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, NT, c0 = _walk(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]

    # S [BK, BV]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.)
    for i_t in range(NT):
        tl.store(h + ((c0 + i_t) * H + i_h) * K * V + o_h, b_h.to(h.dtype.element_ty), mask=m_h)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < eos - bos
        o_row = (bos + o_t) * H + i_h
        # [BT, BK], [BT, BV]
        b_w = tl.load(w + o_row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_u = tl.load(u + o_row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        # v' = u - w S
        b_v = b_u.to(tl.float32) - dot_split(b_w, b_h, PRECISION)
        tl.store(v_new + o_row[:, None] * V + o_v[None, :], b_v.to(v_new.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        # S = S + K^T v'     [BK, BT]
        b_kt = tl.trans(tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.))
        b_h += dot_split(b_kt, b_v, PRECISION)  # v' unrounded: S is the final state
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_h, b_h, mask=m_h)


def chunk_fwd_h(k, w, u, initial_state, output_final_state: bool, cu_seqlens, chunk_offsets,
                N: int, NT: int, BT: int):
    """Returns (h [B, NT, H, K, V] or [1, NT_all, H, K, V], v_new like u, final state or None).

    h is kept in k's dtype (it feeds the output stage's matmuls); the final state in float32.
    """
    B, T, H, K = k.shape
    V = u.shape[-1]
    BK = triton.next_power_of_2(K)
    h = k.new_empty(B if cu_seqlens is None else 1, NT, H, K, V)
    v_new = torch.empty_like(u)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_fwd_h_kernel[grid](k, w, u, v_new, h, initial_state, ht, cu_seqlens, chunk_offsets, T,
                             H=H, K=K, V=V, BT=BT, BK=BK, PRECISION=dot_precision(k.dtype))
    return h, v_new, ht


@triton.heuristics({
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'STORE_INITIAL_STATE_GRADIENT': lambda a: a['dh0'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=STATE_CONFIGS, key=['H', 'K', 'V', 'BT', 'IS_VARLEN'],
                 prune_configs_by={'early_config_prune': _fits})
@triton.jit(do_not_specialize=['T'])
def chunk_bwd_dh_kernel(
    q, k, w, do, dv_local, dv, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The reverse walk over chunks. dS holds the gradient of the state leaving chunk n:

        dh[n] = dS                                   # stored: d(state leaving chunk n)
        dv'   = dv_local + K dS                      # v' feeds the outputs and S_{n+1}
        dS    = dS + (scale Q)^T dO - w^T dv'        # d(state entering chunk n)

    and after the first chunk dS is d(initial_state)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, NT, c0 = _walk(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]

    # dS [BK, BV]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tl.store(dh + ((c0 + i_t) * H + i_h) * K * V + o_h, b_dh.to(dh.dtype.element_ty), mask=m_h)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < eos - bos
        o_row = (bos + o_t) * H + i_h
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        # [BT, BK]
        b_k = tl.load(k + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_dv = tl.load(dv_local + o_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PRECISION)
        tl.store(dv + o_row[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        # [BK, BT]
        b_qt = tl.trans(tl.load(q + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.))
        b_wt = tl.trans(tl.load(w + o_row[:, None] * K + o_k[None, :], mask=m_tk, other=0.))
        b_do = tl.load(do + o_row[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_dh += tl.dot(b_qt, b_do, input_precision=PRECISION) * scale
        b_dh -= tl.dot(b_wt, b_dv.to(b_wt.dtype), input_precision=PRECISION)
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_h, b_dh, mask=m_h)


def chunk_bwd_dh(q, k, w, do, dv_local, dht, scale: float, need_dh0: bool, cu_seqlens,
                 chunk_offsets, N: int, NT: int, BT: int):
    """Returns (dh like h: gradient of the state leaving each chunk, dv' like dv_local,
    d(initial_state) float32 or None)."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    BK = triton.next_power_of_2(K)
    dh = k.new_empty(B if cu_seqlens is None else 1, NT, H, K, V)
    dv = torch.empty_like(dv_local)
    dh0 = k.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    chunk_bwd_dh_kernel[grid](q, k, w, do, dv_local, dv, dh, dht, dh0, cu_seqlens, chunk_offsets,
                              scale, T, H=H, K=K, V=V, BT=BT, BK=BK,
                              PRECISION=dot_precision(k.dtype))
    return dh, dv, dh0
