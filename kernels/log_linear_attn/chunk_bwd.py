"""Log-linear attention, chunked (docs/operators.md section 5): the backward.

With P_ts = level_scales[t, lvl(t, s)] exp(G_t - G_s) scale <q_t, k_s> <do_t, v_s>, the part
of the loss's change that pair (t, s) carries,

    dq_t = sum_s P_ts / <q_t, k_s> k_s,   dk_s = sum_t P_ts / <q_t, k_s> q_t,
    dv_s = sum_t level_scales[t, lvl] exp(G_t - G_s) scale <q_t, k_s> do_t,
    d level_scales[t, l] = sum over s with lvl(t, s) = l of P_ts / level_scales[t, l],
    dg_r = sum over the pairs that straddle r (s < r <= t) of P_ts,

the last because g_r enters exp(G_t - G_s) exactly when s < r <= t. Four kernels:

1. ``chunk_log_linear_attn_bwd_local_kernel``, one program per (chunk, head), the chunk's own
   pairs: dP = dO V^T over every value tile, then dq, dk, dv and the level weights' gradients
   of levels 0 .. c, the chunk's straddling sums for dg (an exclusive prefix sum over s by a
   product with a strictly triangular matrix: no row sum minus its diagonal, which would
   cancel to rounding noise when the gates are strong) and the chunk's state H_n (unless the
   dq walk forms it: chunk.WALK_STATES).
2. ``chunk_log_linear_attn_bwd_dq_kernel``, one program per (value tile, sequence, head): the
   forward's walk again, the level states rebuilt from the H_n; chunk n adds to dq_t, for every
   level c + l it reads, level_scales[t, c + l] exp(G_t - G_{nC - 1}) scale S_l do_t, and
   writes d level_scales[t, c + l] = exp(G_t - G_{nC - 1}) scale <S_l^T q_t, do_t> and
   X_t = sum_l level_scales[t, c + l] d level_scales[t, c + l] (the pairs t has with earlier
   chunks), and apart Xf_t, X_t's pairs with the chunks before n - 1: chunk n - 1's state is
   kept out of its level until chunk n has read both (stages.adjacent_state).
3. ``chunk_log_linear_attn_bwd_dkv_kernel``, one program per (value tile, sequence, head):
   the walk in reverse. Chunk m sees a later chunk n at level c + l (l = bit_length(n XOR
   m)) when bit l - 1 of m is 0 and n lies in the next 2^(l-1) chunks above m's block of
   2^(l-1): one accumulator per level holds, for the chunks of that sibling block, sum_t
   level_scales[t, c + l] exp(G_t - G_{end of m}) scale q_t do_t^T. Chunk m sums the levels
   whose bit is 0 into D and takes dk_s += exp(G_{end of m} - G_s) D v_s, dv_s +=
   exp(G_{end of m} - G_s) D^T k_s and Y_s = <v_s, that dv_s> (the pairs s has with later
   chunks), and apart Yf_s, those with the chunks after m + 1 (chunk m + 1's queries kept out
   of their level likewise); then its own queries join the accumulators of the levels whose
   bit is 1 (the accumulator starts afresh at the top chunk of a sibling block).
4. ``chunk_log_linear_attn_bwd_gates_kernel``, one program per (sequence, head): dg_r for r in
   chunk n = the chunk's own straddling sum + sum of X over t >= r in chunk n + sum of Y over
   s < r in chunk n + Z_n, the pairs from before chunk n to after it. Z_n = Z_{n-1} + sum of
   Yf over chunk n - 1 - sum of Xf over chunk n (float64): the pairs of chunks n - 1 and n
   are in both walks' sums and cancel exactly, so they are left out of both. Taken as the
   whole sums of Y and X, the carry took float32's rounding of every neighbouring pair, in
   two walks that round differently, chunk after chunk: under the long family's strong gates
   (Z_n about 0, the pairs across a chunk boundary of order 1) dg reached 1.6e-6 against the
   float32 reference's 1.0e-7 at 32K tokens (CPU), 2.2e-6 at 64K on an H200.

The two walks are independent: under the switch chunk.WALKS_TOGETHER one launch runs them side
by side (``chunk_log_linear_attn_bwd_walks_kernel``, a third grid axis for the direction).
The walks give dq, dk and the level weights' gradients per value tile (they sum over V): the
tiles add them into one float32 buffer each, onto the local kernel's part (relaxed atomic adds
when there are several tiles: a few ulps of summation order between runs); X, Xf, Y and Yf
keep one float32 slot per tile (small), summed in float64 by the gates kernel; dv and H_n are
per tile.
q and k's gradients are per head, summed over the heads of a group after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import (MIN_TILE, add_row, add_to, chunk_bounds, chunk_index,
                                  chunk_layout, dot_mixed, dot_precision, load_rows, walk_bounds)
from kernels.log_linear_attn.stages import (adjacent_level, adjacent_state, chunk_gates,
                                            chunk_levels, chunk_total, decay_to_end,
                                            intra_weights, level_state, level_weights,
                                            merge_levels, own_state, walk_state, walk_tiles)

__all__ = ["chunk_backward"]

# the local kernel and the walks hold the most tiles at once: at 4 warps the bfloat16 local
# kernel and reverse walk took 255 registers and spilled 864 and 812 bytes a thread at
# K = V = 128 (ptxas, sm_90), and the dq walk 88 bytes with its split state products
WIDE_WARPS = 8


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_log_linear_attn_bwd_local_kernel(
    q, k, v, do, g, ls, hc, dq, dk, dv, dls, dgi, cu_seqlens, chunk_indices, scale, T,
    G: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr,
    PRECISION: tl.constexpr, MIXED: tl.constexpr, STATES_IN_WALK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One chunk and head: its own pairs' gradients, and its state unless the dq walk forms it
    (step 1 of the module docstring); K in tiles of BK."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    i_g = i_h // (H // G)
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_bh // H, T, BT, IS_VARLEN)
    tok0 = bos + i_t * BT
    o_c = tl.arange(0, BT)
    m_t = i_t * BT + o_c < eos - bos
    p_r = (tok0 + o_c) * H + i_h  # the chunk's rows of a [B, T, H, ..] tensor
    p_q, p_k = q + (tok0 * G + i_g) * K, k + (tok0 * G + i_g) * K  # group i_g's rows
    b_b = chunk_gates(g, tok0, i_h, o_c, m_t, H)
    lvl = chunk_levels(o_c, C_BITS)
    b_w = intra_weights(ls, tok0, i_h, o_c, m_t, lvl, H, L, C_BITS, BT)
    causal = (o_c[:, None] >= o_c[None, :]) & m_t[None, :]
    b_ed = tl.where(causal, tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], 0.)
                                   .to(tl.float32)) * scale, 0.)  # scale exp(b_i - b_j)
    b_A0 = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_A0 += tl.dot(load_rows(p_q, o_c, m_t, o_k, K, G),
                       tl.trans(load_rows(p_k, o_c, m_t, o_k, K, G)), input_precision=PRECISION)
    b_A0 *= b_ed
    b_A = b_A0 * b_w  # the forward's scores
    b_f = decay_to_end(b_b, chunk_total(b_b, o_c, eos - bos - i_t * BT, BT), m_t)
    i_s = chunk_index(i_c, i_bh, i_t, T, H, BT, IS_VARLEN) * H + i_h
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)  # <do_i, v_j>
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p_o = p_r[:, None] * V + o_v[None, :]
        m_o = m_t[:, None] & (o_v < V)[None, :]
        b_vv = tl.load(v + p_o, mask=m_o, other=0.)
        b_do = tl.load(do + p_o, mask=m_o, other=0.)
        b_dP += tl.dot(b_do, tl.trans(b_vv), input_precision=PRECISION)
        b_dv = tl.dot(tl.trans(b_A).to(b_do.dtype), b_do, input_precision=PRECISION)
        tl.store(dv + p_o, b_dv, mask=m_o)
        for i_k in range(0 if STATES_IN_WALK else tl.cdiv(K, BK)):  # H_n
            o_k = i_k * BK + tl.arange(0, BK)
            b_h = own_state(p_k, v + (tok0 * H + i_h) * V, o_c, m_t, o_k, o_v, b_f, K, V, G, H,
                            PRECISION, MIXED)
            tl.store(hc + (i_s * K + o_k[:, None]) * V + o_v[None, :], b_h,
                     mask=(o_k < K)[:, None] & (o_v < V)[None, :])
    b_Z = b_dP * b_A0  # P / level_scales
    b_dS = (b_dP * b_ed * b_w).to(q.dtype.element_ty)  # P / <q_i, k_j>
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p_qk = p_r[:, None] * K + o_k[None, :]
        m_qk = m_t[:, None] & (o_k < K)[None, :]
        tl.store(dq + p_qk, tl.dot(b_dS, load_rows(p_k, o_c, m_t, o_k, K, G),
                                   input_precision=PRECISION), mask=m_qk)
        tl.store(dk + p_qk, tl.dot(tl.trans(b_dS), load_rows(p_q, o_c, m_t, o_k, K, G),
                                   input_precision=PRECISION), mask=m_qk)
    for j in tl.static_range(C_BITS + 1):
        if j < L:
            tl.store(dls + p_r * L + j, tl.sum(tl.where(lvl == j, b_Z, 0.), 1), mask=m_t)
    # sum over t >= r of sum over s < r of P_ts: U[s, r] = 1 where s < r, products exact
    b_U = (o_c[:, None] < o_c[None, :]).to(tl.float32)
    b_Pc = tl.dot(b_Z * b_w, b_U, input_precision="ieee")
    tl.store(dgi + p_r, tl.sum(tl.where(o_c[:, None] >= o_c[None, :], b_Pc, 0.), 0), mask=m_t)


@triton.jit
def dq_walk(
    i_v, i_nh, q, k, v, do, g, ls, hc, sc, dq, dls, xs, xf, cu_seqlens, chunk_offsets, scale, T,
    R, G: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr,
    NL: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    STATES_IN_WALK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One value tile, sequence and head: the chunks in order, each one's pairs with earlier
    chunks for dq and the level weights (step 2 of the module docstring), and X_t and its part
    from the chunks before the previous one into xs and xf; R = B * T * H rows a slot;
    program (i_v, i_nh)."""
    i_h = i_nh % H
    i_g = i_h // (H // G)
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_nh // H, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    o_k, o_v, o_l, o_s, p_sc = walk_tiles(sc, i_nh, i_v, V, BK, BV, BL, NL + 1)
    slot = i_v.to(tl.int64) * R  # this value tile's rows of xs and xf
    NV: tl.constexpr = (V + BV - 1) // BV
    b_dec = tl.zeros([BL], dtype=tl.float32)
    for n in range(NT):
        tok0 = bos + n * BT
        m_t = n * BT + o_c < eos - bos
        p_r = (tok0 + o_c) * H + i_h
        b_q = load_rows(q + (tok0 * G + i_g) * K, o_c, m_t, o_k, K, G)
        b_do = tl.load(do + p_r[:, None] * V + o_v[None, :],
                       mask=m_t[:, None] & (o_v < V)[None, :], other=0.)
        b_b = chunk_gates(g, tok0, i_h, o_c, m_t, H)
        b_e = tl.exp(b_b.to(tl.float32)) * scale  # exp(G_t - G_{nC - 1}) scale
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_x = tl.zeros([BT], dtype=tl.float32)
        b_xf = tl.zeros([BT], dtype=tl.float32)  # X_t's pairs with the chunks before n - 1
        l_a = adjacent_level(n, NL)  # chunk n - 1's level, its state apart in slot NL
        for l in range(1, NL + 1):  # the levels c + l whose bit l - 1 is set in n
            if ((n >> (l - 1)) & 1) == 1:
                b_S = level_state(p_sc, l, b_dec, o_l, o_s, BK, BV)
                m_l = m_t & (C_BITS + l < L)
                b_l = level_weights(ls, tok0, i_h, o_c, m_l, C_BITS + l, H, L)
                b_r = tl.sum(dot_mixed(b_q, b_S, PRECISION, MIXED) * b_do, 1) * b_e
                b_xf += b_l * b_r
                if l == l_a:  # the level again with chunk n - 1 in it
                    b_S += adjacent_state(p_sc, l, b_dec, o_l, o_s, BK, BV, NL)
                    b_r = tl.sum(dot_mixed(b_q, b_S, PRECISION, MIXED) * b_do, 1) * b_e
                add_row(dls + p_r * L + C_BITS + l, b_r, m_l, NV)  # d level_scales[t, c + l]
                b_x += b_l * b_r
                b_dq += (b_l * b_e)[:, None] * dot_mixed(b_do, tl.trans(b_S), PRECISION, MIXED)
        add_to(dq + p_r[:, None] * K + o_k[None, :], b_dq, m_t[:, None] & (o_k < K)[None, :],
               NV)  # onto the chunk's own part
        tl.store(xs + slot + p_r, b_x, mask=m_t)
        tl.store(xf + slot + p_r, b_xf, mask=m_t)
        b_H = walk_state(k, v, hc, b_b, tok0, c0 + n, i_g, i_h, o_c, m_t, o_k, o_v,
                         eos - bos - n * BT, K, V, G, H, BT, PRECISION, MIXED, STATES_IN_WALK)
        b_dec *= tl.exp(chunk_total(b_b, o_c, eos - bos - n * BT, BT).to(tl.float32))
        b_dec = merge_levels(p_sc, b_H, b_dec, n, o_l, o_s, BK, BV, NL, True)


@triton.jit
def dkv_walk(
    i_v, i_nh, q, k, v, do, g, ls, sc, dk, dv, ys, yf, cu_seqlens, chunk_offsets, scale, T, R,
    G: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr,
    NL: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One value tile, sequence and head: the chunks in reverse, each one's pairs with later
    chunks for dk and dv (step 3 of the module docstring), and Y_s and its part from the chunks
    after the next one into ys and yf; the scratch sc starts at zero; program (i_v, i_nh)."""
    i_h = i_nh % H
    i_g = i_h // (H // G)
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_nh // H, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    o_k, o_v, o_l, o_s, p_sc = walk_tiles(sc, i_nh, i_v, V, BK, BV, BL, NL + 1)
    slot = i_v.to(tl.int64) * R  # this value tile's rows of ys and yf
    NV: tl.constexpr = (V + BV - 1) // BV
    b_dec = tl.zeros([BL], dtype=tl.float32)
    for i in range(NT):
        m = NT - 1 - i
        tok0 = bos + m * BT
        m_t = m * BT + o_c < eos - bos
        p_r = (tok0 + o_c) * H + i_h
        p_o = p_r[:, None] * V + o_v[None, :]
        m_o = m_t[:, None] & (o_v < V)[None, :]
        b_k = load_rows(k + (tok0 * G + i_g) * K, o_c, m_t, o_k, K, G)
        b_vv = tl.load(v + p_o, mask=m_o, other=0.)
        b_b = chunk_gates(g, tok0, i_h, o_c, m_t, H)
        b_last = chunk_total(b_b, o_c, eos - bos - m * BT, BT)
        b_f = decay_to_end(b_b, b_last, m_t)  # exp(G_end - G_s)
        b_D = tl.zeros([BK, BV], dtype=tl.float32)
        for l in range(1, NL + 1):  # the levels whose bit l - 1 is 0 in m
            if ((m >> (l - 1)) & 1) == 0:
                b_D += level_state(p_sc, l, b_dec, o_l, o_s, BK, BV)
        b_fv = b_vv.to(tl.float32) * b_f[:, None]
        tl.store(yf + slot + p_r, tl.sum(dot_mixed(b_k, b_D, PRECISION, MIXED) * b_fv, 1),
                 mask=m_t)  # Y_s's pairs with the chunks after m + 1
        # chunk m + 1's queries, apart in slot NL, at its level (none past the last chunk)
        l_a = adjacent_level(m + 1, NL)
        if l_a <= NL:
            b_D += adjacent_state(p_sc, l_a, b_dec, o_l, o_s, BK, BV, NL)
        b_dv = dot_mixed(b_k, b_D, PRECISION, MIXED) * b_f[:, None]
        b_dk = dot_mixed(b_vv, tl.trans(b_D), PRECISION, MIXED)
        add_to(dk + p_r[:, None] * K + o_k[None, :], b_dk * b_f[:, None],
               m_t[:, None] & (o_k < K)[None, :], NV)  # onto the chunk's own part
        tl.store(ys + slot + p_r, tl.sum(b_dv * b_vv.to(tl.float32), 1), mask=m_t)
        tl.store(dv + p_o, b_dv + tl.load(dv + p_o, mask=m_o, other=0.), mask=m_o)
        b_dec *= tl.exp(b_last.to(tl.float32))
        b_dec = join_queries(q, do, ls, p_sc, b_dec, b_b, tok0, m, i_g, i_h, o_c, m_t, o_k,
                             o_v, o_l, o_s, scale, G, H, K, V, L, BK, BV, C_BITS, NL,
                             PRECISION, MIXED)


@triton.jit
def join_queries(q, do, ls, p_sc, b_dec, b_b, tok0, m, i_g, i_h, o_c, m_t, o_k, o_v, o_l,
                 o_s, scale, G: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 C_BITS: tl.constexpr, NL: tl.constexpr, PRECISION: tl.constexpr,
                 MIXED: tl.constexpr):
    """The reverse walk's step to chunk m - 1 (b_dec already decayed over chunk m): chunk m's
    queries sum_t level_scales[t, c + l] exp(G_t - G_{mC - 1}) scale q_t do_t^T join the
    accumulator of every level l whose bit is set in m; at the lowest, where chunk m - 1 will
    read them next, they stay apart in slot NL (adjacent_state). Returns the decays."""
    b_q = load_rows(q + (tok0 * G + i_g) * K, o_c, m_t, o_k, K, G)
    b_do = tl.load(do + ((tok0 + o_c) * H + i_h)[:, None] * V + o_v[None, :],
                   mask=m_t[:, None] & (o_v < V)[None, :], other=0.)
    b_e = tl.exp(b_b.to(tl.float32)) * scale  # exp(G_t - G_{mC - 1}) scale
    l_0 = adjacent_level(m, NL)
    for l in range(1, NL + 1):
        if ((m >> (l - 1)) & 1) == 1:
            b_l = level_weights(ls, tok0, i_h, o_c, m_t & (C_BITS + l < L), C_BITS + l, H, L)
            b_E = dot_mixed(tl.trans(b_q), b_do.to(tl.float32) * (b_l * b_e)[:, None],
                            PRECISION, MIXED)
            # a sibling block starts afresh at its top chunk (bits 0 .. l - 1 of m set); at a
            # partial block's top, NT - 1, the accumulator is still the scratch's 0
            b_rest = tl.zeros([BK, BV], dtype=tl.float32)
            top = (2 << (l - 1)) - 1
            if (m & top) != top:
                b_rest = level_state(p_sc, l, b_dec, o_l, o_s, BK, BV)
            if l == l_0:
                tl.store(p_sc + NL * BK * BV + o_s, b_E)
            else:
                b_rest += b_E
            tl.store(p_sc + (l - 1) * BK * BV + o_s, b_rest)
            tl.debug_barrier()  # other threads of the program read the tiles back
            b_dec = tl.where(o_l == l - 1, 1., b_dec)
    return b_dec


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T', 'R'])
def chunk_log_linear_attn_bwd_dq_kernel(
    q, k, v, do, g, ls, hc, sc, dq, dls, xs, xf, cu_seqlens, chunk_offsets, scale, T, R,
    G: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr,
    NL: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    STATES_IN_WALK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The dq walk, one program per (sequence and head, value tile)."""
    dq_walk(tl.program_id(1), tl.program_id(0), q, k, v, do, g, ls, hc, sc, dq, dls, xs, xf,
            cu_seqlens, chunk_offsets, scale, T, R, G, H, K, V, L, BK, BV, BT, C_BITS, NL, BL,
            PRECISION, MIXED, STATES_IN_WALK, IS_VARLEN)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T', 'R'])
def chunk_log_linear_attn_bwd_dkv_kernel(
    q, k, v, do, g, ls, sc, dk, dv, ys, yf, cu_seqlens, chunk_offsets, scale, T, R,
    G: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr,
    NL: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The reverse walk, one program per (sequence and head, value tile)."""
    dkv_walk(tl.program_id(1), tl.program_id(0), q, k, v, do, g, ls, sc, dk, dv, ys, yf,
             cu_seqlens, chunk_offsets, scale, T, R, G, H, K, V, L, BK, BV, BT, C_BITS, NL, BL,
             PRECISION, MIXED, IS_VARLEN)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T', 'R'])
def chunk_log_linear_attn_bwd_walks_kernel(
    q, k, v, do, g, ls, hc, sc, sc_r, dq, dk, dv, dls, xs, xf, ys, yf, cu_seqlens, chunk_offsets,
    scale, T, R, G: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, C_BITS: tl.constexpr,
    NL: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    STATES_IN_WALK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Both walks in one launch (WALKS_TOGETHER): program (i_nh, i_v, 0) walks for dq, (i_nh,
    i_v, 1) in reverse for dk and dv, with its own zeroed scratch sc_r."""
    if tl.program_id(2) == 0:
        dq_walk(tl.program_id(1), tl.program_id(0), q, k, v, do, g, ls, hc, sc, dq, dls, xs, xf,
                cu_seqlens, chunk_offsets, scale, T, R, G, H, K, V, L, BK, BV, BT, C_BITS, NL,
                BL, PRECISION, MIXED, STATES_IN_WALK, IS_VARLEN)
    else:
        dkv_walk(tl.program_id(1), tl.program_id(0), q, k, v, do, g, ls, sc_r, dk, dv, ys, yf,
                 cu_seqlens, chunk_offsets, scale, T, R, G, H, K, V, L, BK, BV, BT, C_BITS, NL,
                 BL, PRECISION, MIXED, IS_VARLEN)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T', 'R'])
def chunk_log_linear_attn_bwd_gates_kernel(
    dgi, xs, xf, ys, yf, dg, cu_seqlens, chunk_offsets, T, R, H: tl.constexpr,
    NV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence and head: dg from the chunks' own straddling sums and the walks' X and Y
    (step 4 of the module docstring), the carry Z_n from their parts beyond the neighbouring
    chunk (xf, yf)."""
    i_nh = tl.program_id(0)
    i_h = i_nh % H
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_nh // H, T, BT, IS_VARLEN)
    o_c = tl.arange(0, BT)
    b_z = tl.sum(tl.zeros([BT], dtype=tl.float64), 0)  # Z_n
    for n in range(NT):
        m_t = n * BT + o_c < eos - bos
        p_r = (bos + n * BT + o_c) * H + i_h
        b_x = tl.zeros([BT], dtype=tl.float64)
        b_y = tl.zeros([BT], dtype=tl.float64)
        b_xf = tl.zeros([BT], dtype=tl.float64)
        b_yf = tl.zeros([BT], dtype=tl.float64)
        p_s = p_r  # int64: the rows in value tile i_v's slot
        for i_v in range(NV):
            b_x += tl.load(xs + p_s, mask=m_t, other=0.).to(tl.float64)
            b_y += tl.load(ys + p_s, mask=m_t, other=0.).to(tl.float64)
            b_xf += tl.load(xf + p_s, mask=m_t, other=0.).to(tl.float64)
            b_yf += tl.load(yf + p_s, mask=m_t, other=0.).to(tl.float64)
            p_s += R
        b_z -= tl.sum(b_xf, 0)  # Z_n = Z_{n-1} + Yf(n - 1) - Xf(n)
        b_dg = (tl.load(dgi + p_r, mask=m_t, other=0.).to(tl.float64)
                + tl.cumsum(b_x, 0, reverse=True) + tl.cumsum(b_y, 0) - b_y + b_z)
        tl.store(dg + p_r, b_dg.to(tl.float32), mask=m_t)
        b_z += tl.sum(b_yf, 0)


def chunk_backward(q, k, v, g, level_scales, do, scale, cu_seqlens, BT, BV, NL,
                   states_in_walk, walks_together, mixed):
    """dq, dk, dv, dg, d level_scales of chunk_log_linear_attn (in the inputs' dtypes), from
    the saved inputs and dO; BT, BV, NL and the switches (chunk.WALK_STATES,
    chunk.WALKS_TOGETHER, chunk.WALK_MIXED) as the forward's."""
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_scales.shape[-1]
    do = do.contiguous()
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, BT)
    chunks = NT * (B if cu_seqlens is None else 1)
    BK = max(MIN_TILE, triton.next_power_of_2(K))
    NV = triton.cdiv(V, BV)
    R = B * T * H
    f32 = {"dtype": torch.float32, "device": q.device}
    dq = torch.empty(B, T, H, K, **f32)  # the local kernel writes every row, the walks add
    dk = torch.empty(B, T, H, K, **f32)
    dv = torch.empty(B, T, H, V, **f32)
    dls = torch.zeros(B, T, H, L, **f32)
    xs, xf, ys, yf = (torch.empty(NV, B, T, H, **f32) for _ in range(4))
    dgi, dg = torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32)
    meta = dict(G=G, H=H, K=K, V=V, L=L, BK=BK, BV=BV, BT=BT, C_BITS=BT.bit_length() - 1,
                PRECISION=dot_precision(q.dtype), MIXED=mixed, num_warps=4)
    walk = dict(NL=NL, BL=triton.next_power_of_2(NL), **{**meta, "num_warps": WIDE_WARPS})
    if NT:
        hc = torch.empty(0 if states_in_walk else chunks, H, K, V, **f32)
        chunk_log_linear_attn_bwd_local_kernel[(NT, B * H)](
            q, k, v, do, g, level_scales, hc, dq, dk, dv, dls, dgi, cu_seqlens, chunk_indices,
            float(scale), T, STATES_IN_WALK=states_in_walk,
            **{**meta, "BK": MIN_TILE, "num_warps": WIDE_WARPS})
        sc = torch.empty(N * H * NV, NL + 1, BK, BV, **f32)  # slot NL: stages.adjacent_state
        if walks_together:  # the reverse walk's accumulators start empty, in a scratch of their
            # own (the walks run at once on a GPU; the interpreter runs them one after the other)
            chunk_log_linear_attn_bwd_walks_kernel[(N * H, NV, 2)](
                q, k, v, do, g, level_scales, hc, sc, torch.zeros_like(sc), dq, dk, dv, dls, xs,
                xf, ys, yf, cu_seqlens, chunk_offsets, float(scale), T, R,
                STATES_IN_WALK=states_in_walk,
                **walk)
            del hc
        else:
            chunk_log_linear_attn_bwd_dq_kernel[(N * H, NV)](
                q, k, v, do, g, level_scales, hc, sc, dq, dls, xs, xf, cu_seqlens, chunk_offsets,
                float(scale), T, R, STATES_IN_WALK=states_in_walk, **walk)
            del hc
            sc.zero_()
            chunk_log_linear_attn_bwd_dkv_kernel[(N * H, NV)](
                q, k, v, do, g, level_scales, sc, dk, dv, ys, yf, cu_seqlens, chunk_offsets,
                float(scale), T, R, **walk)
        chunk_log_linear_attn_bwd_gates_kernel[(N * H,)](
            dgi, xs, xf, ys, yf, dg, cu_seqlens, chunk_offsets, T, R, H=H, NV=NV, BT=BT)
    else:
        for x in (dq, dk, dv, dg):
            x.zero_()
    del xs, xf, ys, yf, dgi
    # to the inputs' dtypes one at a time, each float32 buffer freed before the next is cast
    dv = dv.to(v.dtype)
    dq = _group_sum(dq, G).to(q.dtype)
    dk = _group_sum(dk, G).to(k.dtype)
    return dq, dk, dv, dg.to(g.dtype), dls.to(level_scales.dtype)


def _group_sum(x: torch.Tensor, G: int) -> torch.Tensor:
    """[B, T, H, K] per head -> [B, T, G, K] per q/k group (the heads sharing it summed)."""
    B, T, H, K = x.shape
    return x if G == H else x.view(B, T, G, H // G, K).sum(3)
