"""chunk_titans_linear's forward walk (kernels/titans/chunk.py has the math and the switches):
one program per (sequence, head) carries M and S over the mini-batches, storing what the
outputs take from them, and, before it, one program per (mini-batch, head) forms the gate
factors the walk's updates take (chunk.WALK_GATES_AHEAD) and, for the replay, the outputs'.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.minibatch import (dot_state, mini_batch_program, start_square,
                                      store_square_scaled, walk_program)
from kernels.common.utils import load_rows, store_rows, walk_bounds
from kernels.titans.stages import (ahead_gates, dot_q, gate_rows, grads_from_z, hand_on,
                                   hand_on_gates, hand_on_scaled, recon_grads, segment_products,
                                   update_gates)

__all__ = ["chunk_titans_linear_fwd_gates_kernel", "chunk_titans_linear_fwd_walk_kernel"]


@triton.jit
def walk_rows(q, k, v, theta, alpha, eta, i_t, bos, L, i_h, o_c, o_d, D: tl.constexpr,
              H: tl.constexpr, BC: tl.constexpr, WITH_Q: tl.constexpr):
    """Mini-batch i_t's rows as the forward walk takes them: (Q in its own dtype (WITH_Q; else
    K's rows), K, V, theta, 1 - alpha, eta) as stages.mini_batch_rows (nothing past the
    sequence)."""
    row0 = (bos + i_t * BC) * H + i_h
    m_t = i_t * BC + o_c < L
    b_kh = load_rows(k + row0 * D, o_c, m_t, o_d, D, H)
    b_qh = b_kh
    if WITH_Q:
        b_qh = load_rows(q + row0 * D, o_c, m_t, o_d, D, H)
    b_v = load_rows(v + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_th, b_a, b_e = gate_rows(theta, alpha, eta, row0, o_c, m_t, H)
    return b_qh, b_kh.to(tl.float32), b_v, b_th, b_a, b_e


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_fwd_gates_kernel(
    w, b, theta, alpha, eta, gc, gn, ga, gf, cu_seqlens, chunk_indices, T, H: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
    OUTPUTS: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: stages.update_gates, stored for the walk (WALK_GATES_AHEAD) and
    the replay: cM, cS per row into gc [B, T, H, 2], f0[n], e0[n], p0[n] into gn [mini-batches,
    H, 4]; with OUTPUTS (the replay) also what the outputs take from the gates, P theta^T into
    ga [mini-batches, H, C, C] and f0, p0 per row into gf [B, T, H, 2]."""
    i_s, row0, o_c, m_t, n_t, _, _, _, _, _, _ = mini_batch_program(
        w, b, cu_seqlens, chunk_indices, T, H, D, BD, BC, IS_VARLEN)
    b_th, b_a, b_e = gate_rows(theta, alpha, eta, row0, o_c, m_t, H)
    if OUTPUTS:
        b_F, b_f0, _, _ = segment_products(b_a, o_c)
        b_E, b_e0, _, _ = segment_products(b_e, o_c)
        b_pn, b_en, f0n, e0n, p0n = hand_on_gates(b_F, b_f0, b_E, b_e0, o_c == n_t - 1)
        b_cm, b_cs = b_pn * b_th, b_en * b_th
        b_P = tl.dot(b_F, b_E, input_precision=PRECISION)
        tl.store(ga + i_s * BC * BC + o_c[:, None] * BC + o_c[None, :], b_P * b_th[None, :])
        p = (row0 + o_c * H) * 2
        tl.store(gf + p, b_f0, mask=m_t)
        tl.store(gf + p + 1, tl.sum(b_F * b_e0[None, :], 1), mask=m_t)
    else:
        b_cm, b_cs, f0n, e0n, p0n = update_gates(b_th, b_a, b_e, o_c, o_c == n_t - 1)
    p = (row0 + o_c * H) * 2
    tl.store(gc + p, b_cm, mask=m_t)
    tl.store(gc + p + 1, b_cs, mask=m_t)
    tl.store(gn + i_s * 4, f0n)
    tl.store(gn + i_s * 4 + 1, e0n)
    tl.store(gn + i_s * 4 + 2, p0n)


@triton.jit
def store_states(hs, ss, hr, sr, i_s, b_M, b_S, o_d, m_d, o_s, m_s, D: tl.constexpr,
                 SCALED: tl.constexpr):
    """Store the M0, S0 a mini-batch starts from as state i_s of hs, ss (SCALED: in float16,
    rows scaled, the inverse scales into hr, sr; HALF_STATES)."""
    if SCALED:
        store_square_scaled(hs, hr, i_s, b_M, o_d, m_d, o_s, m_s, D)
        store_square_scaled(ss, sr, i_s, b_S, o_d, m_d, o_s, m_s, D)
    else:
        tl.store(hs + i_s * D * D + o_s, b_M.to(hs.dtype.element_ty), mask=m_s)
        tl.store(ss + i_s * D * D + o_s, b_S.to(ss.dtype.element_ty), mask=m_s)


@triton.jit
def store_products(qm, qs, row0, o_c, m_t, o_d, b_qh, b_M, b_S, scale, D: tl.constexpr,
                   H: tl.constexpr, PRECISION: tl.constexpr, OMIXED: tl.constexpr):
    """Store Q~ M0, Q~ S0 (stages.dot_q, OMIXED as the outputs kernel takes them from float32
    states) of a mini-batch as rows of qm, qs [B, T, H, D] (WALK_PRODUCTS)."""
    b_q = b_qh.to(tl.float32) * scale
    store_rows(qm + row0 * D, dot_q(b_q, b_qh, b_M, scale, PRECISION, OMIXED), o_c, m_t, o_d,
               D, H)
    store_rows(qs + row0 * D, dot_q(b_q, b_qh, b_S, scale, PRECISION, OMIXED), o_c, m_t, o_d,
               D, H)


@triton.jit
def walk_step(q, k, v, theta, alpha, eta, gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h, o_c, o_d,
              m_d, b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e, b_w, b_b, scale, eps,
              D: tl.constexpr, H: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
              MIXED: tl.constexpr, UMIXED: tl.constexpr, OMIXED: tl.constexpr,
              PRODUCTS: tl.constexpr, STORE_G: tl.constexpr, STORE_Z: tl.constexpr,
              PREFETCH: tl.constexpr, GATES_AHEAD: tl.constexpr, ACCUMULATE: tl.constexpr,
              SCALES: tl.constexpr):
    """Mini-batch i_t of the walk: (M, S handed on, their scales, the rows the next step
    takes). With PREFETCH b_qh .. b_e are this mini-batch's rows and the next one's are loaded
    here; without, this one's are. With SCALES the states are m M^, s S^ (b_M, b_S the tiles;
    stages.hand_on_scaled), else b_M, b_S themselves (m, s as given). With STORE_Z (not with
    SCALES) Z = K M0 goes to zs [B, T, H, D] for the backward (chunk.HALF_STATES_BACKWARD)."""
    if PREFETCH:
        n_qh, n_k, n_v, n_th, n_a, n_e = walk_rows(q, k, v, theta, alpha, eta, i_t + 1, bos, L,
                                                   i_h, o_c, o_d, D, H, BC, PRODUCTS)
    else:
        b_qh, b_k, b_v, b_th, b_a, b_e = walk_rows(q, k, v, theta, alpha, eta, i_t, bos, L, i_h,
                                                   o_c, o_d, D, H, BC, PRODUCTS)
        n_qh, n_k, n_v, n_th, n_a, n_e = b_qh, b_k, b_v, b_th, b_a, b_e
    m_t = i_t * BC + o_c < L
    row0 = (bos + i_t * BC) * H + i_h
    if SCALES:  # Z = m (K M^)
        b_z = dot_state(b_k, b_M, k.dtype.element_ty, PRECISION, MIXED) * m
        b_g = grads_from_z(b_z, b_k, b_v, b_w, b_b, m_t, m_d, D, eps)
    else:
        b_g, b_z = recon_grads(b_k, b_v, b_M, b_w, b_b, m_t, m_d, D, eps, k.dtype.element_ty,
                               PRECISION, MIXED)
    if STORE_Z:
        store_rows(zs + row0 * D, b_z, o_c, m_t, o_d, D, H)
    if PRODUCTS:
        store_products(qm, qs, row0, o_c, m_t, o_d, b_qh, b_M, b_S, scale, D, H, PRECISION,
                       OMIXED)
    if STORE_G:
        store_rows(gs + row0 * D, b_g, o_c, m_t, o_d, D, H)
    # P[n] theta, E[n] theta, f0[n], e0[n], p0[n] (n: the last real token)
    if GATES_AHEAD:
        b_cm, b_cs, f0n, e0n, p0n = ahead_gates(gc, gn, ((c0 + i_t) * H + i_h).to(tl.int64), i_t,
                                                bos, L, i_h, o_c, H, BC)
    else:
        b_cm, b_cs, f0n, e0n, p0n = update_gates(
            b_th, b_a, b_e, o_c, o_c == tl.minimum(BC, L - i_t * BC) - 1)
    if SCALES:
        b_M, b_S, m, s = hand_on_scaled(b_M, b_S, m, s, b_k, b_g, b_cm, b_cs, f0n, e0n, p0n,
                                        k.dtype.element_ty, PRECISION, UMIXED)
    else:
        b_M, b_S = hand_on(b_M, b_S, b_k, b_g, b_cm, b_cs, f0n, e0n, p0n, k.dtype.element_ty,
                           PRECISION, UMIXED, ACCUMULATE)
    return b_M, b_S, m, s, n_qh, n_k, n_v, n_th, n_a, n_e


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'USE_INITIAL_MOMENTUM': lambda a: a['s0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'STORE_STATES': lambda a: a['hs'] is not None,
    'SCALED': lambda a: a['hr'] is not None,
    'PRODUCTS': lambda a: a['qm'] is not None,
    'STORE_G': lambda a: a['gs'] is not None,
    'STORE_Z': lambda a: a['zs'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_fwd_walk_kernel(
    q, k, v, w, b, theta, alpha, eta, gc, gn, h0, s0, ht, st, hs, ss, hr, sr, qm, qs, gs, zs,
    cu_seqlens, chunk_offsets, segment_offsets, scale, eps, T, H: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, EVERY: tl.constexpr,
    PRECISION: tl.constexpr, MIXED: tl.constexpr, UMIXED: tl.constexpr, OMIXED: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_INITIAL_MOMENTUM: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, STORE_STATES: tl.constexpr, SCALED: tl.constexpr,
    PRODUCTS: tl.constexpr, STORE_G: tl.constexpr, STORE_Z: tl.constexpr,
    PREFETCH: tl.constexpr, GATES_AHEAD: tl.constexpr, ACCUMULATE: tl.constexpr,
    SCALES: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence and head: M and S carried over the mini-batches (the module docstring's
    last line), storing with STORE_STATES the M0, S0 every EVERY-th mini-batch starts from
    (store_states; EVERY > 1: one state per segment of EVERY mini-batches, for the replay),
    with PRODUCTS Q~ M0, Q~ S0 (store_products), with STORE_G each mini-batch's G, with STORE_Z
    its Z; with PREFETCH the next mini-batch's rows loaded ahead (WALK_PREFETCH), with
    GATES_AHEAD the gates' part of the updates loaded from gc, gn (WALK_GATES_AHEAD)."""
    i_nh, i_h, bos, L, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b = walk_program(
        w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC, IS_VARLEN)
    o_c = tl.arange(0, BC)
    b_M = start_square(h0, i_nh, o_s, m_s, D, BD, USE_INITIAL_STATE)
    b_S = start_square(s0, i_nh, o_s, m_s, D, BD, USE_INITIAL_MOMENTUM)
    m, s = 1., 1.  # the states' scales (SCALES)
    # mini-batch 0's rows (without PREFETCH walk_step loads each mini-batch's over them)
    b_qh, b_k, b_v, b_th, b_a, b_e = walk_rows(q, k, v, theta, alpha, eta, 0, bos, L, i_h, o_c,
                                               o_d, D, H, BC, PRODUCTS)
    if EVERY == 1:
        for i_t in range(NT):
            if STORE_STATES:
                store_states(hs, ss, hr, sr, ((c0 + i_t) * H + i_h).to(tl.int64), b_M, b_S, o_d,
                             m_d, o_s, m_s, D, SCALED)
            b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e = walk_step(
                q, k, v, theta, alpha, eta, gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h, o_c,
                o_d, m_d, b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e, b_w, b_b, scale, eps,
                D, H, BC, PRECISION, MIXED, UMIXED, OMIXED, PRODUCTS, STORE_G, STORE_Z,
                PREFETCH, GATES_AHEAD, ACCUMULATE, False)
    else:  # one state per segment of EVERY mini-batches
        k0 = walk_bounds(cu_seqlens, segment_offsets, i_nh // H, T, BC * EVERY, IS_VARLEN)[3]
        for i_g in range(tl.cdiv(NT, EVERY)):
            if STORE_STATES:
                store_states(hs, ss, hr, sr, ((k0 + i_g) * H + i_h).to(tl.int64), b_M * m,
                             b_S * s, o_d, m_d, o_s, m_s, D, SCALED)
            for i_t in range(i_g * EVERY, tl.minimum(NT, i_g * EVERY + EVERY)):
                b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e = walk_step(
                    q, k, v, theta, alpha, eta, gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h,
                    o_c, o_d, m_d, b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e, b_w, b_b,
                    scale, eps, D, H, BC, PRECISION, MIXED, UMIXED, OMIXED, PRODUCTS, STORE_G,
                    False, PREFETCH, GATES_AHEAD, ACCUMULATE, SCALES)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * D * D + o_s, b_M * m, mask=m_s)
        tl.store(st + i_nh.to(tl.int64) * D * D + o_s, b_S * s, mask=m_s)
