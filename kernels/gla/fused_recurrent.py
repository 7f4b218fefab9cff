"""GLA, fused recurrent form (docs/operators.md section 2): one pass over time, state on chip.

Forward. One program per (value tile, sequence, head) holds S [K, BV] in float32 registers and
walks the tokens in order (``reverse``: from the last to the first):

    S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T
    o_t = S_t^T (scale q_t)

The gates are logs <= 0, so every factor exp(g) is in [0, 1]: nothing overflows at any gate
strength. Without gradients (decoding: T = 1 with a carried state) a call is this one launch.

Backward. With dS_t the gradient reaching S_t (from o_t .. and the final state), walking back:

    dS_t     = dS'_t + (scale q_t) do_t^T,   dS'_t = diag(exp(gk_{t+1})) dS_{t+1} diag(exp(gv_{t+1}))
    dk_t     = dS_t v_t,   dv_t = dS_t^T k_t,   d(initial_state) = dS'_{-1}
    dq_t     = scale S_t do_t                        # a forward sweep rebuilding S_t

The gates enter only through the products exp(sum of gk over a segment). Per step,
d gk_t = rowsum(dS_t * S~_t) with S~_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) (S_t less its
k_t v_t^T), and d gv_t the colsum: exact, but S~_t and dS_t live in different sweeps. With
B_t = sum_{r <= t} gk_r every term of the loss that runs through S carries exp(B_t - B_s) for a
query t and a key s <= t (or exp(B_t) for the initial state), so d(loss)/dB_t is the
query-side terms minus the key-side ones, and d gk_t = sum_{r >= t} d(loss)/dB_r (in walking
order). The s = t terms cancel in that difference and are the large ones under strong gates
(everything else decays by exp(gk) at least once), so the kernels keep them apart: they store
the strict parts dq'_t = scale S~_t do_t and dk'_t = dS'_t v_t, d(loss)/dB_t = q_t dq'_t -
k_t dk'_t, and then dq_t = dq'_t + scale k_t (v_t . do_t), dk_t = dk'_t + scale q_t (v_t . do_t).
For gv the same with o'_t do_t - v_t dv'_t, o'_t = S~_t^T (scale q_t), dv'_t = dS'_t^T k_t,
dv_t = dv'_t + scale (q_t . k_t) do_t.

Summed over the whole rest of a sequence those per-token terms would carry a rounding error
growing as sqrt(T) (float32, log gates 20 logsigmoid(x): d gk 1.2e-6 at T = 256, 2.7e-6 at
2048, where the float32 step loop keeps 1e-7). So the sums restart every BT = 64 tokens (in
walking order) from an anchor, the exact per-step d gk at the next chunk's first token: the dq
sweep stores the state entering each chunk (float32, [chunks, H, K, V]: K V / 64 values per
token and head, for the backward only), the dh sweep meets it there with dS, and a third
kernel (one program per chunk and key tile) adds the chunk's terms to its anchor and the s = t
terms to dq' and dk'. The last chunk's anchor is the final state's share,
rowsum(S~_T * d(final state)) without the last token's own k v^T.

Memory. Each sweep's program holds one value tile of S, so dq'_t and dk'_t (sums over V) are
sums over the tiles: one float32 [B, T, H, K] buffer each, which the tiles add into (relaxed
atomics: a few ulps of summation order between runs when there are several tiles). dv, a sum
over K, is whole in each program and is written in v's dtype. With the anchors' states that is
what the backward holds beyond its outputs: at B = 2, T = 32768, H = 16, K = V = 128, 512 MB
for each of dq' and dk' and 1 GB of states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.cumsum import chunk_suffix_sum
from kernels.common.utils import (add_row, check_launchable, chunk_bounds, chunk_index,
                                  chunk_layout, nh_bucket, seq_bounds, tuning,
                                  zero_before_run)
from references.operators import GLA

__all__ = ["fused_recurrent_gla", "fused_recurrent_gla_bwd", "fused_recurrent_gla_fwd"]

MAX_D = 256  # S [K, BV] and a [K] row of q, k, gk are held whole

# Value tile and warps per (K, V, N * H bucket). A step is a chain (decay, rank-1 update, a
# reduction) whose latency sets the time: what fills the device is programs in flight, so
# narrow tiles win when N * H is small. Every config has the same arithmetic per element (sums
# over K in registers) but for the order of the value tiles' float32 sums; the first pins.
SWEEP_CONFIGS = tuning([triton.Config({'BV': BV}, num_warps=w)
                        for BV in (32, 16, 64) for w in (4, 2, 1)])
BT = 64  # the gates' gradient restarts from an exact anchor every BT tokens (see above)


@triton.jit
def _token(bos, L, i_w, i_h, H: tl.constexpr, REVERSE: tl.constexpr):
    """Row (token * H + head, int64) of walking index i_w of a sequence of L tokens at bos."""
    if REVERSE:
        return (bos + L - 1 - i_w) * H + i_h
    else:
        return (bos + i_w) * H + i_h


@triton.jit
def _program(cu_seqlens, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Where every sweep's program (value tile i_v, sequence and head i_nh) starts: its
    sequence's bounds, its rows and columns, and its [BK, BV] tile of one [K, V] state (offsets
    o_s, held entries m_h)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    bos, eos = seq_bounds(cu_seqlens, i_nh // H, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    return (i_v, i_nh, bos, eos, o_k, o_v, m_k, m_v, o_k[:, None] * V + o_v[None, :],
            m_k[:, None] & m_v[None, :])


@triton.jit
def _row(x, i_tok, o_d, m_d, D: tl.constexpr, BD: tl.constexpr, USE: tl.constexpr = True):
    """Row i_tok (token * H + head) of a [.., H, D] tensor at columns o_d where m_d, float32
    (0 elsewhere; zeros when not USE, x then unread). The sweeps load a token's rows a step
    ahead: they go out before the previous token's arithmetic and wait behind it."""
    if USE:
        return tl.load(x + i_tok * D + o_d, mask=m_d, other=0.).to(tl.float32)
    else:
        return tl.zeros([BD], dtype=tl.float32)


@triton.jit
def _decay(b_h, b_gk, b_gv, USE_GK: tl.constexpr, USE_GV: tl.constexpr):
    """diag(exp(gk_t)) b_h diag(exp(gv_t)), given the token's log gate rows."""
    if USE_GK:
        b_h *= tl.exp(b_gk)[:, None]
    if USE_GV:
        b_h *= tl.exp(b_gv)[None, :]
    return b_h


@triton.heuristics({
    'USE_GK': lambda a: a['gk'] is not None,
    'USE_GV': lambda a: a['gv'] is not None,
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=SWEEP_CONFIGS, key=['K', 'V', 'NH_BUCKET', 'USE_GK', 'USE_GV'])
@triton.jit(do_not_specialize=['T'])
def fused_recurrent_gla_fwd_kernel(
    q, k, v, gk, gv, o, h0, ht, cu_seqlens, scale, T, NH_BUCKET,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, USE_GK: tl.constexpr, USE_GV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T, o_t = S_t^T (scale q_t)."""
    i_v, i_nh, bos, eos, o_k, o_v, m_k, m_v, o_s, m_h = _program(cu_seqlens, T, H, K, V, BK, BV,
                                                                 IS_VARLEN)
    i_h = i_nh % H
    o_h = i_nh.to(tl.int64) * K * V + o_s
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0.)
    L = eos - bos
    i_tok = _token(bos, L, 0, i_h, H, REVERSE)
    mk, mv = m_k & (L > 0), m_v & (L > 0)
    b_q, b_k, b_v = _row(q, i_tok, o_k, mk, K, BK), _row(k, i_tok, o_k, mk, K, BK), \
        _row(v, i_tok, o_v, mv, V, BV)
    b_gk, b_gv = _row(gk, i_tok, o_k, mk, K, BK, USE_GK), _row(gv, i_tok, o_v, mv, V, BV, USE_GV)
    for i_t in range(L):
        i_nxt = _token(bos, L, tl.minimum(i_t + 1, L - 1), i_h, H, REVERSE)
        n_q, n_k, n_v = _row(q, i_nxt, o_k, m_k, K, BK), _row(k, i_nxt, o_k, m_k, K, BK), \
            _row(v, i_nxt, o_v, m_v, V, BV)
        n_gk = _row(gk, i_nxt, o_k, m_k, K, BK, USE_GK)
        n_gv = _row(gv, i_nxt, o_v, m_v, V, BV, USE_GV)
        b_h = _decay(b_h, b_gk, b_gv, USE_GK, USE_GV)
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)
        tl.store(o + i_tok * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        b_q, b_k, b_v, b_gk, b_gv, i_tok = n_q, n_k, n_v, n_gk, n_gv, i_nxt
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h, mask=m_h)


@triton.jit
def _chunk_id(chunk_offsets, i_n, i_c, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index (int64) of chunk i_c (in walking order) of sequence i_n among all chunks."""
    if IS_VARLEN:
        return tl.load(chunk_offsets + i_n).to(tl.int64) + i_c
    else:
        return i_n.to(tl.int64) * tl.cdiv(T, BT) + i_c


@triton.heuristics({
    'USE_GK': lambda a: a['gk'] is not None,
    'USE_GV': lambda a: a['gv'] is not None,
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
# autotuning runs every config on the same buffers: the sums over value tiles start at zero
@triton.autotune(configs=SWEEP_CONFIGS, key=['K', 'V', 'NH_BUCKET', 'USE_GK', 'USE_GV'],
                 pre_hook=zero_before_run('dq', 'akt'))
@triton.jit(do_not_specialize=['T'])
def fused_recurrent_gla_bwd_dq_kernel(
    q, k, v, gk, gv, do, h0, dht, dq, odo, ckpt, akt, av, cu_seqlens, chunk_offsets, scale, T,
    NH_BUCKET,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, REVERSE: tl.constexpr, USE_GK: tl.constexpr, USE_GV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The forward walk rebuilding S: dq'_t = scale S~_t do_t (summed over the value tiles
    into dq), with gv also o'_t * do_t. With gates, the state entering each chunk after the
    first (ckpt) and the last chunk's anchors: rowsum(S~_T * d(final state)) (summed into akt)
    and colsum (av)."""
    i_v, i_nh, bos, eos, o_k, o_v, m_k, m_v, o_s, m_h = _program(cu_seqlens, T, H, K, V, BK, BV,
                                                                 IS_VARLEN)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_n, i_h = i_nh // H, i_nh % H
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_s, mask=m_h, other=0.)
    L = eos - bos
    i_tok = _token(bos, L, 0, i_h, H, REVERSE)
    mk, mv = m_k & (L > 0), m_v & (L > 0)
    b_k, b_v, b_do = _row(k, i_tok, o_k, mk, K, BK), _row(v, i_tok, o_v, mv, V, BV), \
        _row(do, i_tok, o_v, mv, V, BV)
    b_q = _row(q, i_tok, o_k, mk, K, BK, USE_GV)
    b_gk, b_gv = _row(gk, i_tok, o_k, mk, K, BK, USE_GK), _row(gv, i_tok, o_v, mv, V, BV, USE_GV)
    for i_t in range(L):
        i_nxt = _token(bos, L, tl.minimum(i_t + 1, L - 1), i_h, H, REVERSE)
        n_k, n_v, n_do = _row(k, i_nxt, o_k, m_k, K, BK), _row(v, i_nxt, o_v, m_v, V, BV), \
            _row(do, i_nxt, o_v, m_v, V, BV)
        n_q = _row(q, i_nxt, o_k, m_k, K, BK, USE_GV)
        n_gk = _row(gk, i_nxt, o_k, m_k, K, BK, USE_GK)
        n_gv = _row(gv, i_nxt, o_v, m_v, V, BV, USE_GV)
        b_h = _decay(b_h, b_gk, b_gv, USE_GK, USE_GV)  # S~_t
        add_row(dq + i_tok * K + o_k, tl.sum(b_h * b_do[None, :], 1) * scale, m_k, NV)
        if USE_GV:
            b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)
            tl.store(odo + i_tok * V + o_v, b_o * b_do, mask=m_v)
        if USE_FINAL_STATE_GRADIENT and (USE_GK or USE_GV):
            if i_t == L - 1:  # the last chunk's anchor: S~_T against d(final state)
                b_f = b_h * tl.load(dht + i_nh.to(tl.int64) * K * V + o_s, mask=m_h, other=0.)
                if USE_GK:
                    add_row(akt + i_nh.to(tl.int64) * K + o_k, tl.sum(b_f, 1), m_k, NV)
                if USE_GV:
                    i_g = _chunk_id(chunk_offsets, i_n, i_t // BT, T, BT, IS_VARLEN)
                    tl.store(av + (i_g * H + i_h) * V + o_v, tl.sum(b_f, 0), mask=m_v)
        b_h += b_k[:, None] * b_v[None, :]
        if USE_GK or USE_GV:
            if (i_t + 1) % BT == 0 and i_t + 1 < L:  # the state entering the next chunk
                i_g = _chunk_id(chunk_offsets, i_n, i_t // BT, T, BT, IS_VARLEN)
                tl.store(ckpt + (i_g * H + i_h) * K * V + o_s, b_h, mask=m_h)
        b_q, b_k, b_v, b_do, b_gk, b_gv, i_tok = n_q, n_k, n_v, n_do, n_gk, n_gv, i_nxt


@triton.heuristics({
    'USE_GK': lambda a: a['gk'] is not None,
    'USE_GV': lambda a: a['gv'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'STORE_INITIAL_STATE_GRADIENT': lambda a: a['dh0'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.autotune(configs=SWEEP_CONFIGS, key=['K', 'V', 'NH_BUCKET', 'USE_GK', 'USE_GV'],
                 pre_hook=zero_before_run('dk', 'dkt', 'ak'))
@triton.jit(do_not_specialize=['T'])
def fused_recurrent_gla_bwd_dh_kernel(
    q, k, v, gk, gv, do, dht, dh0, dk, dv, dvs, dkt, ckpt, ak, av, cu_seqlens, chunk_offsets,
    scale, T, NH_BUCKET,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, REVERSE: tl.constexpr, USE_GK: tl.constexpr, USE_GV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The backward walk: dS from d(final state) to d(initial state). dk'_t = dS'_t v_t
    (summed over the value tiles into dk), dS'_t the gradient from the tokens after t, and
    dv_t = dS_t^T k_t (v's dtype; with gv also dv'_t = dS'_t^T k_t into dvs). The final
    state's own k v^T is one of the s = t terms: its share of the last token's dk, d(final
    state) v_T, is summed into dkt. At each chunk's first token (but the sequence's), the
    anchors of the chunk before: rowsum(dS_t * S~_t) (summed into ak) and colsum (av), S~_t
    from the state the dq walk left in ckpt."""
    i_v, i_nh, bos, eos, o_k, o_v, m_k, m_v, o_s, m_h = _program(cu_seqlens, T, H, K, V, BK, BV,
                                                                 IS_VARLEN)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_n, i_h = i_nh // H, i_nh % H
    o_h = i_nh.to(tl.int64) * K * V + o_s
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    L = eos - bos
    if USE_FINAL_STATE_GRADIENT:
        if L == 0:  # an empty sequence: its final state is its initial state
            b_dh += tl.load(dht + o_h, mask=m_h, other=0.)
    i_tok = _token(bos, L, L - 1, i_h, H, REVERSE)
    mk, mv = m_k & (L > 0), m_v & (L > 0)
    b_q, b_k = _row(q, i_tok, o_k, mk, K, BK), _row(k, i_tok, o_k, mk, K, BK)
    b_v, b_do = _row(v, i_tok, o_v, mv, V, BV), _row(do, i_tok, o_v, mv, V, BV)
    b_gk, b_gv = _row(gk, i_tok, o_k, mk, K, BK, USE_GK), _row(gv, i_tok, o_v, mv, V, BV, USE_GV)
    for i_s in range(L):
        i_w = L - 1 - i_s  # the walking index
        i_nxt = _token(bos, L, tl.maximum(i_w - 1, 0), i_h, H, REVERSE)
        n_q, n_k = _row(q, i_nxt, o_k, m_k, K, BK), _row(k, i_nxt, o_k, m_k, K, BK)
        n_v, n_do = _row(v, i_nxt, o_v, m_v, V, BV), _row(do, i_nxt, o_v, m_v, V, BV)
        n_gk = _row(gk, i_nxt, o_k, m_k, K, BK, USE_GK)
        n_gv = _row(gv, i_nxt, o_v, m_v, V, BV, USE_GV)
        add_row(dk + i_tok * K + o_k, tl.sum(b_dh * b_v[None, :], 1), m_k, NV)
        if USE_GV:
            tl.store(dvs + i_tok * V + o_v, tl.sum(b_dh * b_k[:, None], 0), mask=m_v)
        b_dh += (b_q * scale)[:, None] * b_do[None, :]
        if USE_FINAL_STATE_GRADIENT:
            if i_s == 0:  # the last token: d(final state) joins here
                b_dht = tl.load(dht + o_h, mask=m_h, other=0.)
                add_row(dkt + i_nh.to(tl.int64) * K + o_k, tl.sum(b_dht * b_v[None, :], 1), m_k,
                        NV)
                b_dh += b_dht
        tl.store(dv + i_tok * V + o_v, tl.sum(b_dh * b_k[:, None], 0).to(dv.dtype.element_ty),
                 mask=m_v)
        if USE_GK or USE_GV:
            if i_w % BT == 0 and i_w > 0:  # dS_t and S~_t meet: the exact d g_t
                i_g = _chunk_id(chunk_offsets, i_n, i_w // BT - 1, T, BT, IS_VARLEN)
                b_s = tl.load(ckpt + (i_g * H + i_h) * K * V + o_s, mask=m_h, other=0.)
                b_p = b_dh * _decay(b_s, b_gk, b_gv, USE_GK, USE_GV)
                if USE_GK:
                    add_row(ak + (i_g * H + i_h) * K + o_k, tl.sum(b_p, 1), m_k, NV)
                if USE_GV:
                    tl.store(av + (i_g * H + i_h) * V + o_v, tl.sum(b_p, 0), mask=m_v)
        b_dh = _decay(b_dh, b_gk, b_gv, USE_GK, USE_GV)
        b_q, b_k, b_v, b_do, b_gk, b_gv, i_tok = n_q, n_k, n_v, n_do, n_gk, n_gv, i_nxt
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + o_h, b_dh, mask=m_h)


@triton.heuristics({
    'USE_GK': lambda a: a['dgk'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dkt'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def fused_recurrent_gla_bwd_qk_kernel(
    q, k, v, do, dq, dk, ak, akt, dkt, dqo, dko, dgk, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, REVERSE: tl.constexpr, USE_GK: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Per chunk of BT tokens in walking order and key tile, from the sweeps' strict parts dq',
    dk': dq_t = dq'_t + scale k_t (v_t . do_t), dk_t = dk'_t + scale q_t (v_t . do_t) (+ the
    final state's share at the last walked token), and d gk_i = anchor + sum over walking
    indices j >= i of the chunk of q_j dq'_j - k_j dk'_j (the anchor from ak, or for the
    sequence's last chunk from akt)."""
    i_d, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_bh % H
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_bh // H, T, BT, IS_VARLEN)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    else:
        i_n = (i_bh // H).to(tl.int64)
    L = eos - bos
    o_w = i_t * BT + tl.arange(0, BT)  # walking indices
    m_t = o_w < L
    o_r = (bos + (L - 1 - o_w if REVERSE else o_w)) * H + i_h
    b_vdo = tl.zeros([BT], dtype=tl.float32)  # v_t . do_t
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p, m = o_r[:, None] * V + o_v[None, :], m_t[:, None] & (o_v < V)[None, :]
        b_vdo += tl.sum(tl.load(v + p, mask=m, other=0.).to(tl.float32) *
                        tl.load(do + p, mask=m, other=0.).to(tl.float32), 1)
    o_d = i_d * BK + tl.arange(0, BK)
    m_d = o_d < K
    p, m = o_r[:, None] * K + o_d[None, :], m_t[:, None] & m_d[None, :]
    b_q = tl.load(q + p, mask=m, other=0.).to(tl.float32)
    b_k = tl.load(k + p, mask=m, other=0.).to(tl.float32)
    b_dq, b_dk = tl.load(dq + p, mask=m, other=0.), tl.load(dk + p, mask=m, other=0.)
    last = i_t == (L - 1) // BT  # the chunk holding the sequence's last walked token
    if USE_GK:
        i_g = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN)
        b_a = tl.load(ak + (i_g * H + i_h) * K + o_d, mask=m_d, other=0.)
        if USE_FINAL_STATE_GRADIENT:
            b_a += tl.load(akt + (i_n * H + i_h) * K + o_d, mask=m_d & last, other=0.)
        b_g = tl.cumsum(b_q * b_dq - b_k * b_dk, 0, reverse=True) + b_a[None, :]
        tl.store(dgk + p, b_g.to(dgk.dtype.element_ty), mask=m)
    b_dq += scale * b_k * b_vdo[:, None]
    b_dk += scale * b_q * b_vdo[:, None]
    if USE_FINAL_STATE_GRADIENT:
        b_t = tl.load(dkt + (i_n * H + i_h) * K + o_d, mask=m_d & last, other=0.)
        b_dk += tl.where((o_w == L - 1)[:, None], b_t[None, :], 0.)
    tl.store(dqo + p, b_dq.to(dqo.dtype.element_ty), mask=m)
    tl.store(dko + p, b_dk.to(dko.dtype.element_ty), mask=m)


def _num_sequences(B: int, cu_seqlens: torch.Tensor | None) -> int:
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def fused_recurrent_gla_fwd(q, k, v, gk, gv, scale: float, initial_state, output_final_state: bool,
                            reverse: bool, cu_seqlens):
    """o [B,T,H,V] (v's dtype) and the final state [N,H,K,V] float32 or None; inputs
    contiguous and checked."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=v.device) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    fused_recurrent_gla_fwd_kernel[grid](q, k, v, gk, gv, o, initial_state, ht, cu_seqlens, scale,
                                         T, nh_bucket(N, H), H=H, K=K, V=V,
                                         BK=triton.next_power_of_2(K), REVERSE=reverse)
    return o, ht


def fused_recurrent_gla_bwd(q, k, v, gk, gv, scale: float, initial_state, do, dht, reverse: bool,
                            cu_seqlens):
    """(dq, dk, dv, dgk or None, dgv or None, d(initial state) or None): dq, dk, dv in the
    inputs' dtype, the gates' in theirs, d(initial state) float32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, BT)
    chunks = NT * (B if cu_seqlens is None else 1)
    f32 = dict(dtype=torch.float32, device=q.device)
    # the strict parts dq', dk': float32 sums over the sweeps' value tiles
    dq, dk = torch.zeros(B, T, H, K, **f32), torch.zeros(B, T, H, K, **f32)
    dv = torch.empty_like(v)
    dvs = torch.empty(B, T, H, V, **f32) if gv is not None else None  # dv', for d gv
    dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
    odo = torch.empty(B, T, H, V, **f32) if gv is not None else None
    final = dht is not None
    ckpt = torch.empty(chunks, H, K, V, **f32) if gk is not None or gv is not None else None
    ak = torch.zeros(chunks, H, K, **f32) if gk is not None else None
    akt = torch.zeros(N, H, K, **f32) if gk is not None and final else None
    av = torch.zeros(chunks, H, V, **f32) if gv is not None else None
    dkt = torch.zeros(N, H, K, **f32) if final else None  # d(final state) v_T, per sequence
    grid = lambda meta: (triton.cdiv(V, meta['BV']), N * H)  # noqa: E731
    dims = dict(H=H, K=K, V=V, BK=triton.next_power_of_2(K), BT=BT, REVERSE=reverse)
    fused_recurrent_gla_bwd_dq_kernel[grid](q, k, v, gk, gv, do, initial_state, dht, dq, odo, ckpt,
                                            akt, av, cu_seqlens, chunk_offsets, scale, T,
                                            nh_bucket(N, H), **dims)
    fused_recurrent_gla_bwd_dh_kernel[grid](q, k, v, gk, gv, do, dht, dh0, dk, dv, dvs, dkt, ckpt,
                                            ak, av, cu_seqlens, chunk_offsets, scale, T,
                                            nh_bucket(N, H), **dims)
    del ckpt
    dqo, dko = torch.empty_like(q), torch.empty_like(k)
    dgk = torch.empty_like(gk) if gk is not None else None
    if NT:
        BD = min(64, triton.next_power_of_2(K))
        fused_recurrent_gla_bwd_qk_kernel[(triton.cdiv(K, BD), NT, B * H)](
            q, k, v, do, dq, dk, ak, akt, dkt, dqo, dko, dgk, cu_seqlens, chunk_indices, scale,
            T, H=H, K=K, V=V, BT=BT, BK=BD, BV=min(64, triton.next_power_of_2(V)),
            REVERSE=reverse)
    dgv = None
    if gv is not None:
        dgv = chunk_suffix_sum(odo - v.float() * dvs, av, reverse, cu_seqlens, chunk_indices, NT,
                               BT, out_dtype=gv.dtype)
    return dqo, dko, dv, dgk, dgv, dh0

class FusedRecurrentGLAFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, gk, gv, scale, initial_state, output_final_state, reverse, cu_seqlens):
        o, ht = fused_recurrent_gla_fwd(q, k, v, gk, gv, scale, initial_state, output_final_state,
                                        reverse, cu_seqlens)
        ctx.save_for_backward(q, k, v, gk, gv, initial_state, cu_seqlens)
        ctx.scale, ctx.reverse = scale, reverse
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gk, gv, initial_state, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dgk, dgv, dh0 = fused_recurrent_gla_bwd(
            q, k, v, gk, gv, ctx.scale, initial_state, do.contiguous().to(v.dtype),
            None if dht is None else dht.contiguous().float(), ctx.reverse, cu_seqlens)
        if dh0 is not None:
            dh0 = dh0.to(initial_state.dtype)
        return dq, dk, dv, dgk, dgv, None, dh0, None, None, None


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated linear attention, one pass over time with the state on chip (docs/operators.md
    section 2), forward and backward.

    Args:
        q, k: ``[B, T, H, K]``, K <= 256.  v: ``[B, T, H, V]``, V <= 256 (one dtype).
        gk: ``[B, T, H, K]`` key-side log gate (<= 0) or None.  gv: ``[B, T, H, V]`` or None.
        scale: multiplies q before the read-out; ``None`` means ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences).
        output_final_state: also return the state after the last token walked, float32.
        reverse: walk each sequence from its last token to its first.
        cu_seqlens: ``[N + 1]`` int64 offsets of packed sequences (then B == 1).

    Returns:
        ``o [B, T, H, V]`` in v's dtype, and the final state ``[N, H, K, V]`` or None.
    """
    dims = GLA.validate(locals())  # the call's own arguments, before anything else
    check_launchable("fused_recurrent_gla", q)
    if max(dims["K"], dims["V"]) > MAX_D:
        raise ValueError(f"fused_recurrent_gla: K and V must be <= {MAX_D}, "
                         f"got K={dims['K']}, V={dims['V']}")
    scale = GLA.resolve_scale(scale, dims)
    q, k, v = (x.contiguous() for x in (q, k, v))
    gk, gv, initial_state, cu_seqlens = (None if x is None else x.contiguous()
                                         for x in (gk, gv, initial_state, cu_seqlens))
    tensors = (q, k, v, gk, gv, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return FusedRecurrentGLAFunction.apply(q, k, v, gk, gv, scale, initial_state,
                                               output_final_state, reverse, cu_seqlens)
    # no gradients (e.g. decoding T = 1 with a carried state): one launch
    return fused_recurrent_gla_fwd(q, k, v, gk, gv, scale, initial_state, output_final_state,
                                   reverse, cu_seqlens)
