"""chunk_titans_linear's outputs (kernels/titans/chunk.py has the math, walk.py the walk): one
program per (mini-batch, head) forms O from what the walk stored for it, or one program per
(segment of mini-batches, head) replays the walk over its segment from a stored state.

``chunk_titans_linear_fwd_o_kernel`` takes a mini-batch's M0, S0 (chunk.WALK_PRODUCTS None, and
every call with a backward) or its G, Q~ M0 and Q~ S0 as the walk stored them (WALK_PRODUCTS).
``chunk_titans_linear_fwd_replay_kernel`` (chunk.REPLAY, in calls without a backward) takes
the M0, S0 the walk stored at the start of each segment of REPLAY mini-batches and the G it
stored for every mini-batch, and carries the two states over the segment as the walk did
(stages.hand_on, with G given, so no Z and no LayerNorm gradient), each mini-batch's O formed
on the way (chunk.REPLAY_CHAIN); ``chunk_titans_linear_fwd_segment_kernel`` forms the same
outputs with the updates unrolled over the segment, all its rows at once (the replay's
default). Either way the walk issues neither Q~ M0 nor Q~ S0, and the replay runs in parallel
over the segments.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.layernorm import layer_norm_rows
from kernels.common.minibatch import (head_tiles, load_square, load_square_as,
                                      mini_batch_program, step_wait)
from kernels.common.utils import (chunk_bounds, chunk_index, load_rows, load_rows_as, store_rows,
                                  walk_bounds)
from kernels.titans.stages import (ahead_gates, dot_q, gate_rows, hand_on, load_states,
                                   mini_batch_rows, segment_products, stored_grads)

__all__ = ["chunk_titans_linear_fwd_o_kernel", "chunk_titans_linear_fwd_replay_kernel"]


@triton.jit
def output_products(q, row0, o_c, m_t, o_d, b_q, b_k, b_M, b_S, scale, D: tl.constexpr,
                    H: tl.constexpr, PRECISION: tl.constexpr, OMIXED: tl.constexpr):
    """(Q~ M0, Q~ S0, Q~ K^T) [C, BD], [C, BD], [C, C] as stages.dot_q takes them (under OMIXED
    from Q's rows loaded again in their own dtype). M0's products, then S0's: one state's
    operand copy in shared memory at a time."""
    b_qh = load_rows(q + row0 * D, o_c, m_t, o_d, D, H)
    return (dot_q(b_q, b_qh, b_M, scale, PRECISION, OMIXED),
            dot_q(b_q, b_qh, b_S, scale, PRECISION, OMIXED),
            dot_q(b_q, b_qh, tl.trans(b_k.to(b_qh.dtype)), scale, PRECISION, OMIXED))


@triton.jit
def from_states(q, k, v, theta, alpha, eta, hs, ss, hr, sr, zs, i_s, row0, o_c, m_t, o_d, m_d,
                o_s, m_s, b_w, b_b, scale, eps, D: tl.constexpr, H: tl.constexpr,
                PRECISION: tl.constexpr, MIXED: tl.constexpr, OMIXED: tl.constexpr,
                SCALED: tl.constexpr, ZS: tl.constexpr):
    """(G, Q~ M0, Q~ S0, Q~ K^T, theta, 1 - alpha, eta) of a mini-batch from the M0, S0 it
    starts with (SCALED: as the walk stored them under HALF_STATES "float16"); with ZS, G from
    the Z = K M0 the walk stored (HALF_STATES_BACKWARD), not from the rounded M0."""
    b_M, b_S = load_states(hs, ss, hr, sr, i_s, o_d, m_d, o_s, m_s, D, SCALED)
    b_q, b_k, b_v, b_th, b_a, b_e = mini_batch_rows(q, k, v, theta, alpha, eta, row0, o_c, m_t,
                                                    o_d, scale, D, H)
    b_g, _ = stored_grads(b_k, b_v, b_M, zs, row0, o_c, m_t, o_d, m_d, b_w, b_b, D, H, eps,
                          k.dtype.element_ty, PRECISION, MIXED, ZS)
    b_qm, b_qs, b_qk = output_products(q, row0, o_c, m_t, o_d, b_q, b_k, b_M, b_S, scale, D, H,
                                       PRECISION, OMIXED)
    return b_g, b_qm, b_qs, b_qk, b_th, b_a, b_e


@triton.jit
def from_products(q, k, theta, alpha, eta, qm, qs, gs, row0, o_c, m_t, o_d, scale,
                  D: tl.constexpr, H: tl.constexpr, PRECISION: tl.constexpr,
                  OMIXED: tl.constexpr):
    """from_states' values as the walk stored them under WALK_PRODUCTS (G, Q~ M0, Q~ S0),
    Q~ K^T formed here."""
    b_qh = load_rows(q + row0 * D, o_c, m_t, o_d, D, H)
    b_k = load_rows(k + row0 * D, o_c, m_t, o_d, D, H)
    b_qk = dot_q(b_qh.to(tl.float32) * scale, b_qh, tl.trans(b_k.to(b_qh.dtype)), scale,
                 PRECISION, OMIXED)
    b_th, b_a, b_e = gate_rows(theta, alpha, eta, row0, o_c, m_t, H)
    return (load_rows(gs + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(qm + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(qs + row0 * D, o_c, m_t, o_d, D, H), b_qk, b_th, b_a, b_e)


@triton.heuristics({
    'SCALED': lambda a: a['hr'] is not None,
    'ZS': lambda a: a['zs'] is not None,
    'PRODUCTS': lambda a: a['qm'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_fwd_o_kernel(
    q, k, v, w, b, theta, alpha, eta, o, hs, ss, hr, sr, zs, qm, qs, gs, cu_seqlens,
    chunk_indices, scale, eps, T, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BC: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr, OMIXED: tl.constexpr,
    SCALED: tl.constexpr, ZS: tl.constexpr, PRODUCTS: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: O (module docstring) from the M0, S0 it starts with, or with
    PRODUCTS from G, Q~ M0 and Q~ S0 as the walk stored them."""
    i_s, row0, o_c, m_t, _, o_d, m_d, o_s, m_s, b_w, b_b = mini_batch_program(
        w, b, cu_seqlens, chunk_indices, T, H, D, BD, BC, IS_VARLEN)
    if PRODUCTS:
        b_g, b_qm, b_qs, b_qk, b_th, b_a, b_e = from_products(
            q, k, theta, alpha, eta, qm, qs, gs, row0, o_c, m_t, o_d, scale, D, H, PRECISION,
            OMIXED)
    else:
        b_g, b_qm, b_qs, b_qk, b_th, b_a, b_e = from_states(
            q, k, v, theta, alpha, eta, hs, ss, hr, sr, zs, i_s, row0, o_c, m_t, o_d, m_d, o_s,
            m_s, b_w, b_b, scale, eps, D, H, PRECISION, MIXED, OMIXED, SCALED, ZS)
    b_F, b_f0, _, _ = segment_products(b_a, o_c)
    b_E, b_e0, _, _ = segment_products(b_e, o_c)
    b_P = tl.dot(b_F, b_E, input_precision=PRECISION)
    b_p0 = tl.sum(b_F * b_e0[None, :], 1)
    b_A = b_P * b_th[None, :] * b_qk
    b_u = (b_f0[:, None] * b_qm + b_p0[:, None] * b_qs
           - tl.dot(b_A, b_g, input_precision=PRECISION))
    b_x, _ = layer_norm_rows(b_u, m_d, D, eps)
    store_rows(o + row0 * D, b_u + b_w[None, :] * b_x + b_b[None, :], o_c, m_t, o_d, D, H)


@triton.jit
def replay_outputs(o, ga, gf, i_s, row0, o_c, m_t, o_d, m_d, b_g, b_qm, b_qs, b_qk, b_w, b_b,
                   eps, D: tl.constexpr, H: tl.constexpr, BC: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Store a mini-batch's O as the outputs kernel forms it (U = f0 (Q~ M0) + p0 (Q~ S0) -
    ((P theta^T) o (Q~ K^T)) G, O = U + w LN(U) + b), the gates' part as the gates kernel
    stored it (P theta^T in ga, f0 and p0 per row in gf): no segment products formed."""
    b_A = tl.load(ga + i_s * BC * BC + o_c[:, None] * BC + o_c[None, :]) * b_qk
    p = (row0 + o_c * H) * 2
    b_f0 = tl.load(gf + p, mask=m_t, other=0.)
    b_p0 = tl.load(gf + p + 1, mask=m_t, other=0.)
    b_u = (b_f0[:, None] * b_qm + b_p0[:, None] * b_qs
           - tl.dot(b_A, b_g, input_precision=PRECISION))
    b_x, _ = layer_norm_rows(b_u, m_d, D, eps)
    store_rows(o + row0 * D, b_u + b_w[None, :] * b_x + b_b[None, :], o_c, m_t, o_d, D, H)


@triton.jit
def segment_program(i_c, i_bh, w, b, cu_seqlens, chunk_offsets, segment_indices, T,
                    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
                    EVERY: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What the program of segment i_c (among all) and of i_bh (batch entry and head) handles:
    (i_nh, i_k, c0, i_g, bos, L, n_j) (its sequence and head as the walk counts them, its
    stored state's index, its sequence's first mini-batch among all, the segment's index in
    the sequence, the sequence's first token and length, the segment's mini-batches), then
    head_tiles."""
    i_n, i_h = i_bh // H, i_bh % H
    bos, eos, i_g = chunk_bounds(cu_seqlens, segment_indices, i_c, i_n, T, BC * EVERY,
                                 IS_VARLEN)
    i_k = chunk_index(i_c, i_bh, i_g, T, H, BC * EVERY, IS_VARLEN) * H + i_h
    if IS_VARLEN:
        i_n = tl.load(segment_indices + i_c * 2).to(tl.int64)
    c0 = walk_bounds(cu_seqlens, chunk_offsets, i_n, T, BC, IS_VARLEN)[3]
    o_d, m_d, o_s, m_s, b_w, b_b = head_tiles(w, b, i_h, D, BD)
    L = eos - bos
    n_j = tl.minimum(EVERY, tl.cdiv(L, BC) - i_g * EVERY)
    return i_n * H + i_h, i_k, c0, i_g, bos, L, n_j, o_d, m_d, o_s, m_s, b_w, b_b


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_fwd_replay_kernel(
    q, k, w, b, o, hs, ss, gs, gc, gn, ga, gf, cu_seqlens, chunk_offsets, segment_indices,
    scale, eps, T, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    EVERY: tl.constexpr, PRECISION: tl.constexpr, UMIXED: tl.constexpr,
    OMIXED: tl.constexpr, ACCUMULATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One segment of EVERY mini-batches and head: M, S from the state the walk stored at the
    segment's start (hs, ss), handed on over its mini-batches with the G the walk stored (gs)
    as the walk hands them on (stages.hand_on, UMIXED, ACCUMULATE; the gates from gc, gn), and
    each mini-batch's O (replay_outputs; Q~ M0, Q~ S0 and Q~ K^T as from_products takes them,
    under OMIXED)."""
    i_nh, i_k, c0, i_g, bos, L, n_j, o_d, m_d, o_s, m_s, b_w, b_b = segment_program(
        tl.program_id(0), tl.program_id(1), w, b, cu_seqlens, chunk_offsets, segment_indices, T,
        H, D, BD, BC, EVERY, IS_VARLEN)
    i_h = i_nh % H
    o_c = tl.arange(0, BC)
    b_M = load_square(hs, i_k, o_s, m_s, D)
    b_S = load_square(ss, i_k, o_s, m_s, D)
    for j in range(n_j):
        i_t = i_g * EVERY + j
        i_s = ((c0 + i_t) * H + i_h).to(tl.int64)
        row0 = (bos + i_t * BC) * H + i_h
        m_t = i_t * BC + o_c < L
        b_qh = load_rows(q + row0 * D, o_c, m_t, o_d, D, H)
        b_kh = load_rows(k + row0 * D, o_c, m_t, o_d, D, H)
        b_g = load_rows(gs + row0 * D, o_c, m_t, o_d, D, H)
        b_q = b_qh.to(tl.float32) * scale
        replay_outputs(o, ga, gf, i_s, row0, o_c, m_t, o_d, m_d, b_g,
                       dot_q(b_q, b_qh, b_M, scale, PRECISION, OMIXED),
                       dot_q(b_q, b_qh, b_S, scale, PRECISION, OMIXED),
                       dot_q(b_q, b_qh, tl.trans(b_kh), scale, PRECISION, OMIXED), b_w, b_b, eps,
                       D, H, BC, PRECISION)
        if j < n_j - 1:
            b_cm, b_cs, f0n, e0n, p0n = ahead_gates(gc, gn, i_s, i_t, bos, L, i_h, o_c, H, BC)
            b_M, b_S = hand_on(b_M, b_S, b_kh.to(tl.float32), b_g, b_cm, b_cs, f0n, e0n, p0n,
                               k.dtype.element_ty, PRECISION, UMIXED, ACCUMULATE)


@triton.jit
def coefficients_back(b_al, b_be, b_ep, gn, i_s, n_r, m):
    """The coefficients with which a unit of M and of S at mini-batch m + 1's start reach the
    M and S of row t's mini-batch n(t) (M_n = alpha M_{m+1} + beta S_{m+1} + ..., S_n =
    epsilon S_{m+1} + ...), from those of mini-batch m + 2's start (b_al, b_be, b_ep) and
    mini-batch m + 1's f0, e0, p0 (gn[i_s]): alpha <- f0 alpha, beta <- p0 alpha + e0 beta,
    epsilon <- e0 epsilon; rows of mini-batch m + 1 start at (1, 0, 1), earlier ones stay 0."""
    f0n, e0n, p0n = tl.load(gn + i_s * 4), tl.load(gn + i_s * 4 + 1), tl.load(gn + i_s * 4 + 2)
    b_al, b_be, b_ep = f0n * b_al, p0n * b_al + e0n * b_be, e0n * b_ep
    at = n_r == m + 1
    return tl.where(at, 1., b_al), tl.where(at, 0., b_be), tl.where(at, 1., b_ep)


@triton.jit
def segment_outputs(i_c, i_r, i_bh, q, k, w, b, o, hs, ss, gs, gc, gn, ga, gf, progress,
                    cu_seqlens, chunk_offsets, segment_indices, scale, eps, T, H: tl.constexpr,
                    D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, EVERY: tl.constexpr,
                    ROWS: tl.constexpr, PRECISION: tl.constexpr, OMIXED: tl.constexpr,
                    GPRECISION: tl.constexpr, WAIT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Rows i_r * ROWS .. of segment i_c (EVERY mini-batches) of i_bh (batch entry and head;
    chunk_titans_linear_fwd_segment_kernel's); with WAIT, once the walk's progress flag for
    its sequence and head has passed the segment (minibatch.step_wait), its stores then read
    with ".cg" asked for. With M_c, S_c the states the walk stored at the segment's start,
    n(t) row t's mini-batch and alpha, beta, epsilon the coefficients with which mini-batch
    m's updates (m = -1: M_c, S_c) reach M and S of mini-batch n(t) (coefficients_back, over
    m from the last mini-batch to the first),

        U = f0 o (alpha Q~ M_c + beta Q~ S_c) + p0 o epsilon (Q~ S_c)
            - sum_m ((Q~ K_m^T) o W_m) G_m,
        W_m[t, j] = f0_t alpha_t cM_j + (f0_t beta_t + p0_t epsilon_t) cS_j  where n(t) > m,
                    (P theta^T)[t, j]                                      where n(t) = m,

    then O = U + w LN(U) + b: each state the walk hands on, unrolled over the segment; the
    products with G_m in GPRECISION (chunk.REPLAY_G_PRECISION)."""
    i_nh, i_k, c0, i_g, bos, L, n_j, o_d, m_d, o_s, m_s, b_w, b_b = segment_program(
        i_c, i_bh, w, b, cu_seqlens, chunk_offsets, segment_indices, T, H, D, BD, BC, EVERY,
        IS_VARLEN)
    i_h = i_nh % H
    CACHE: tl.constexpr = ".cg" if WAIT else ""
    if WAIT:
        step_wait(progress + i_nh, i_g)
    o_r = i_r * ROWS + tl.arange(0, ROWS)  # within the segment
    n_r = o_r // BC
    m_r = i_g * EVERY * BC + o_r < L
    # the mini-batches whose updates reach them (none past the sequence's end)
    n_m = tl.where(i_r * (ROWS // BC) < n_j, tl.minimum(n_j, (i_r + 1) * (ROWS // BC)), 0)
    row0 = (bos + i_g * EVERY * BC) * H + i_h
    b_qh = load_rows(q + row0 * D, o_r, m_r, o_d, D, H)
    b_q = b_qh.to(tl.float32) * scale
    p = (row0 + o_r * H) * 2
    b_f0 = tl.load(gf + p, mask=m_r, other=0.)
    b_p0 = tl.load(gf + p + 1, mask=m_r, other=0.)
    o_c = tl.arange(0, BC)
    b_al = tl.zeros([ROWS], dtype=tl.float32)
    b_be = tl.zeros([ROWS], dtype=tl.float32)
    b_ep = tl.zeros([ROWS], dtype=tl.float32)
    b_u = tl.zeros([ROWS, BD], dtype=tl.float32)
    for i in range(n_m):
        m = n_m - 1 - i
        i_s = ((c0 + i_g * EVERY + m) * H + i_h).to(tl.int64)
        if i > 0:  # mini-batch m + 1's factors
            b_al, b_be, b_ep = coefficients_back(b_al, b_be, b_ep, gn, i_s + H, n_r, m)
        rowm = row0 + m * BC * H
        m_c = (i_g * EVERY + m) * BC + o_c < L
        b_kh = load_rows(k + rowm * D, o_c, m_c, o_d, D, H)
        b_cm = tl.load(gc + (rowm + o_c * H) * 2, mask=m_c, other=0.)
        b_cs = tl.load(gc + (rowm + o_c * H) * 2 + 1, mask=m_c, other=0.)
        b_W = ((b_f0 * b_al)[:, None] * b_cm[None, :]
               + (b_f0 * b_be + b_p0 * b_ep)[:, None] * b_cs[None, :])
        b_W += tl.load(ga + i_s * BC * BC + (o_r % BC)[:, None] * BC + o_c[None, :],
                       mask=(n_r == m)[:, None], other=0.)
        b_W *= dot_q(b_q, b_qh, tl.trans(b_kh), scale, PRECISION, OMIXED)
        b_u -= tl.dot(b_W, load_rows_as(gs + rowm * D, o_c, m_c, o_d, D, H, "", CACHE),
                      input_precision=GPRECISION)
    # the stored states: mini-batch 0's factors, rows of mini-batch 0 at (1, 0, 1)
    b_al, b_be, b_ep = coefficients_back(b_al, b_be, b_ep, gn, ((c0 + i_g * EVERY) * H + i_h
                                                               ).to(tl.int64), n_r, -1)
    b_u += (b_f0 * b_al)[:, None] * dot_q(
        b_q, b_qh, load_square_as(hs, i_k, o_s, m_s, D, "", CACHE), scale, PRECISION, OMIXED)
    b_u += (b_f0 * b_be + b_p0 * b_ep)[:, None] * dot_q(
        b_q, b_qh, load_square_as(ss, i_k, o_s, m_s, D, "", CACHE), scale, PRECISION, OMIXED)
    b_x, _ = layer_norm_rows(b_u, m_d, D, eps)
    store_rows(o + row0 * D, b_u + b_w[None, :] * b_x + b_b[None, :], o_r, m_r, o_d, D, H)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_fwd_segment_kernel(
    q, k, w, b, o, hs, ss, gs, gc, gn, ga, gf, cu_seqlens, chunk_offsets, segment_indices,
    scale, eps, T, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    EVERY: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr, OMIXED: tl.constexpr,
    GPRECISION: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One segment of EVERY mini-batches and head, ROWS of its EVERY C rows at once (the
    replay without a chain, chunk.REPLAY_CHAIN off; EVERY C // ROWS programs a segment, each
    taking the updates of the mini-batches up to its last row's): segment_outputs."""
    BLOCKS: tl.constexpr = EVERY * BC // ROWS
    segment_outputs(tl.program_id(0) // BLOCKS, tl.program_id(0) % BLOCKS, tl.program_id(1),
                    q, k, w, b, o, hs, ss, gs, gc, gn, ga, gf, gn, cu_seqlens, chunk_offsets,
                    segment_indices, scale, eps, T, H, D, BD, BC, EVERY, ROWS, PRECISION, OMIXED,
                    GPRECISION, False, IS_VARLEN)
