"""Stages shared by log-linear attention's forward and backward kernels (chunk.py, chunk_bwd.py):
a chunk's levels, gates and level weights, and the Fenwick level states of a walk.

A walk keeps the states of levels 1 .. NL (above the chunk's own levels) in a float32 scratch
``p_sc`` of [NS, BK, BV] and one decay factor per level on chip in ``b_dec`` [BL]: the true
state of level l is b_dec[l - 1] * p_sc[l - 1], so decaying every state over a chunk is one
multiplication of a vector.

The backward's walks keep one slot more (NS = NL + 1): the neighbouring chunk's part of its
level, apart from the rest of the level until the chunk next to it has read both. dg's carry
across chunks (chunk_bwd.py) takes the pairs of neighbouring chunks out of both walks' sums, so
that what it adds up chunk after chunk is only the pairs further apart (``adjacent_level``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.utils import dot_mixed, load_rows

# A log gate of -inf (a mask) reads as this: its exp is 0 in float32 and float64 alike, and
# cumulative sums stay finite, so that no decay is exp(-inf - -inf) = NaN. 2^20 tokens of it
# sum to -1e10, exact enough in float64.
GATE_FLOOR = tl.constexpr(-1e4)


@triton.jit
def chunk_levels(o_c, C_BITS: tl.constexpr):
    """lvl(i, j) = bit_length(i XOR j) over a chunk's positions o_c, [C, C] int32."""
    x = o_c[:, None] ^ o_c[None, :]
    lvl = tl.zeros_like(x)
    for b in tl.static_range(C_BITS):
        lvl += ((x >> b) > 0).to(tl.int32)
    return lvl


@triton.jit
def chunk_gates(g, tok0, i_h, o_c, m_t, H: tl.constexpr):
    """The chunk's cumulative log gates b [C] (b_i = sum of g over its tokens 0 .. i), float64,
    0 past the sequence's end (the gates there read as 0), -inf gates as GATE_FLOOR."""
    b_g = tl.load(g + (tok0 + o_c) * H + i_h, mask=m_t, other=0.).to(tl.float64)
    return tl.cumsum(tl.maximum(b_g, GATE_FLOOR), 0)


@triton.jit
def chunk_total(b_b, o_c, n_real, BT: tl.constexpr):
    """The chunk's total log gate: b at its last real token (n_real tokens, at most BT)."""
    return tl.sum(tl.where(o_c == tl.minimum(BT, n_real) - 1, b_b, 0.), 0)


@triton.jit
def level_weights(ls, tok0, i_h, o_c, m_t, lvl, H: tl.constexpr, L: tl.constexpr):
    """level_scales[t, lvl] over the chunk's tokens (0 past the sequence's end)."""
    return tl.load(ls + ((tok0 + o_c) * H + i_h) * L + lvl, mask=m_t, other=0.).to(tl.float32)


@triton.jit
def intra_weights(ls, tok0, i_h, o_c, m_t, lvl, H: tl.constexpr, L: tl.constexpr,
                  C_BITS: tl.constexpr, BT: tl.constexpr):
    """level_scales[i, lvl(i, j)] over a chunk's pairs, [C, C] float32 (levels 0 .. c; a
    shorter sequence has fewer levels, and no pair at the missing ones)."""
    b_w = tl.zeros([BT, BT], dtype=tl.float32)
    for j in tl.static_range(C_BITS + 1):
        if j < L:
            b_l = level_weights(ls, tok0, i_h, o_c, m_t, j, H, L)
            b_w += tl.where(lvl == j, b_l[:, None], 0.)
    return b_w


@triton.jit
def decay_to_end(b_b, b_last, m_t):
    """exp(b_last - b_s) over the chunk's tokens s (0 past the sequence's end), float32."""
    return tl.where(m_t, tl.exp((b_last - b_b).to(tl.float32)), 0.)


@triton.jit
def own_state(p_k, p_v, o_c, m_t, o_k, o_v, b_f, K: tl.constexpr, V: tl.constexpr,
              G: tl.constexpr, H: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr):
    """The chunk's own state H_n = sum_s exp(b_last - b_s) k_s v_s^T on rows o_k, columns o_v,
    float32 (the decayed keys kept in float32, multiplied as MIXED says); p_k at the chunk's
    first key row of its group, p_v at its first value row of its head, b_f = decay_to_end."""
    b_k = load_rows(p_k, o_c, m_t, o_k, K, G).to(tl.float32) * b_f[:, None]
    b_v = load_rows(p_v, o_c, m_t, o_v, V, H)
    return dot_mixed(tl.trans(b_k), b_v, PRECISION, MIXED)


@triton.jit
def walk_state(k, v, hc, b_b, tok0, i_s, i_g, i_h, o_c, m_t, o_k, o_v, n_real,
               K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, H: tl.constexpr,
               BT: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
               STATES_IN_WALK: tl.constexpr):
    """A walk's tile of chunk i_s's own state (n_real tokens from tok0): formed from k and v
    (STATES_IN_WALK), or read from hc [chunks, H, K, V] where the local kernel stored it."""
    if STATES_IN_WALK:
        b_f = decay_to_end(b_b, chunk_total(b_b, o_c, n_real, BT), m_t)
        b_H = own_state(k + (tok0 * G + i_g) * K, v + (tok0 * H + i_h) * V, o_c, m_t, o_k, o_v,
                        b_f, K, V, G, H, PRECISION, MIXED)
    else:
        b_H = tl.load(hc + (i_s * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.)
    return b_H


@triton.jit
def walk_tiles(sc, i_nh, i_v, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BL: tl.constexpr, NS: tl.constexpr):
    """A walk program's (o_k, o_v, o_l, o_s, p_sc): its key rows, value columns (tile i_v),
    level lanes, the offsets of a [BK, BV] tile in its scratch, and where its scratch of NS
    tiles starts in sc (one per sequence x head i_nh and value tile)."""
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_l = tl.arange(0, BL)
    o_s = o_k[:, None] * BV + tl.arange(0, BV)[None, :]
    p_sc = sc + (i_nh * tl.cdiv(V, BV) + i_v).to(tl.int64) * NS * BK * BV
    return o_k, o_v, o_l, o_s, p_sc


@triton.jit
def level_state(p_sc, l, b_dec, o_l, o_s, BK: tl.constexpr, BV: tl.constexpr):
    """The state of level l (>= 1) with its decay applied, [BK, BV] float32."""
    d_l = tl.sum(tl.where(o_l == l - 1, b_dec, 0.), 0)
    return d_l * tl.load(p_sc + (l - 1) * BK * BV + o_s)


@triton.jit
def adjacent_level(n, NL: tl.constexpr):
    """The level above the chunk's at which chunk n >= 1 meets chunk n - 1: 1 + the trailing
    zeros of n (bit_length(n XOR (n - 1))); NL + 1 for n = 0."""
    p = 1
    for b in tl.static_range(NL):
        p += tl.where((n & ((2 << b) - 1)) == 0, 1, 0)
    return p


@triton.jit
def adjacent_state(p_sc, l, b_dec, o_l, o_s, BK: tl.constexpr, BV: tl.constexpr,
                   NL: tl.constexpr):
    """The neighbouring chunk's part of level l, kept apart in slot NL, with level l's decay,
    [BK, BV] float32; the slot is folded into level l's as it is read (no later chunk needs
    it apart)."""
    d_l = tl.sum(tl.where(o_l == l - 1, b_dec, 0.), 0)
    p_l = p_sc + (l - 1) * BK * BV + o_s
    b_a = tl.load(p_sc + NL * BK * BV + o_s)
    b_rest = tl.load(p_l)
    tl.debug_barrier()  # every thread has read level l's tile before it changes
    tl.store(p_l, b_rest + b_a)
    tl.debug_barrier()
    return d_l * b_a


@triton.jit
def merge_levels(p_sc, b_H, b_dec, n, o_l, o_s, BK: tl.constexpr, BV: tl.constexpr,
                 NL: tl.constexpr, APART: tl.constexpr = False):
    """The forward walk's step after chunk n (b_dec already decayed over it, b_H the chunk's
    own state): levels 1 .. p and b_H merge into level p + 1, p the trailing zeros of n + 1
    (references/log_linear_attn.py); APART keeps b_H in slot NL instead (adjacent_state).
    Returns the decays."""
    p = 0  # trailing zeros of n + 1, at most NL
    for b in tl.static_range(NL):
        p += tl.where(((n + 1) & ((2 << b) - 1)) == 0, 1, 0)
    if APART:
        tl.store(p_sc + NL * BK * BV + o_s, b_H)
        b_H = tl.zeros([BK, BV], dtype=tl.float32)
    for l in range(1, p + 1):
        b_H += level_state(p_sc, l, b_dec, o_l, o_s, BK, BV)
    if p < NL:
        tl.store(p_sc + p * BK * BV + o_s, b_H)
        b_dec = tl.where(o_l == p, 1., b_dec)
    tl.debug_barrier()  # other threads of the program read the tiles back
    return b_dec
