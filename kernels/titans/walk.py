"""chunk_titans_linear's forward walk (kernels/titans/chunk.py has the math and the switches):
one program per (sequence, head) carries M and S over the mini-batches, storing what the
outputs take from them, and, before it, one program per (mini-batch, head) forms the gate
factors the walk's updates take (chunk.WALK_GATES_AHEAD) and, for the replay, the outputs'.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.minibatch import (dot_state, dot_state_into, mini_batch_program,
                                      sequence_program, start_square, step_signal,
                                      store_square_scaled)
from kernels.common.utils import load_rows, store_rows, walk_bounds
from kernels.titans.stages import (ahead_gates, dot_q, gate_rows, grads_from_z, hand_on,
                                   hand_on_gates, hand_on_scaled, handed_scales, recon_grads,
                                   segment_products, update_gates)

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


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
                    'ZERO_FLAGS': lambda a: a['flags'] is not None})
@triton.jit(do_not_specialize=['T', 'NF'])
def chunk_titans_linear_fwd_gates_kernel(
    w, b, theta, alpha, eta, gc, gn, ga, gf, flags, NF, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr, OUTPUTS: tl.constexpr, ZERO_FLAGS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: stages.update_gates, stored for the walk (WALK_GATES_AHEAD) and
    the replay: cM, cS per row into gc [B, T, H, 2], f0[n], e0[n], p0[n] into gn [mini-batches,
    H, 4]; with OUTPUTS (the replay) also what the outputs take from the gates, P theta^T into
    ga [mini-batches, H, C, C] and f0, p0 per row into gf [B, T, H, 2]. With flags (the
    counter and progress flags of the launch that follows on the stream, the walk and replay
    in one: overlap.py), program (0, 0) zeroes their NF int32 too, instead of a launch of its
    own."""
    if ZERO_FLAGS:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            for i in range(0, NF, 128):
                o_f = i + tl.arange(0, 128)
                tl.store(flags + o_f, tl.zeros([128], dtype=tl.int32), mask=o_f < NF)
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
def stores_and_gates(gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h, row0, o_c, m_t, o_d, b_qh,
                     b_M, b_S, b_z, b_g, b_th, b_a, b_e, scale, D: tl.constexpr,
                     H: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
                     OMIXED: tl.constexpr, PRODUCTS: tl.constexpr, STORE_G: tl.constexpr,
                     STORE_Z: tl.constexpr, GATES_AHEAD: tl.constexpr):
    """What a walk stores of mini-batch i_t (its Z with STORE_Z, Q~ M0 and Q~ S0 with PRODUCTS,
    G with STORE_G), then what its updates take from the gates: (P[n] theta, E[n] theta,
    f0[n], e0[n], p0[n]), n the last real token, loaded (GATES_AHEAD) or formed."""
    if STORE_Z:
        store_rows(zs + row0 * D, b_z, o_c, m_t, o_d, D, H)
    if PRODUCTS:
        store_products(qm, qs, row0, o_c, m_t, o_d, b_qh, b_M, b_S, scale, D, H, PRECISION,
                       OMIXED)
    if STORE_G:
        store_rows(gs + row0 * D, b_g, o_c, m_t, o_d, D, H)
    if GATES_AHEAD:
        b_cm, b_cs, f0n, e0n, p0n = ahead_gates(gc, gn, ((c0 + i_t) * H + i_h).to(tl.int64), i_t,
                                                bos, L, i_h, o_c, H, BC)
    else:
        b_cm, b_cs, f0n, e0n, p0n = update_gates(
            b_th, b_a, b_e, o_c, o_c == tl.minimum(BC, L - i_t * BC) - 1)
    return b_cm, b_cs, f0n, e0n, p0n


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
    b_cm, b_cs, f0n, e0n, p0n = stores_and_gates(
        gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h, row0, o_c, m_t, o_d, b_qh, b_M, b_S, b_z,
        b_g, b_th, b_a, b_e, scale, D, H, BC, PRECISION, OMIXED, PRODUCTS, STORE_G, STORE_Z,
        GATES_AHEAD)
    if SCALES:
        b_M, b_S, m, s = hand_on_scaled(b_M, b_S, m, s, b_k, b_g, b_cm, b_cs, f0n, e0n, p0n,
                                        k.dtype.element_ty, PRECISION, UMIXED)
    else:
        b_M, b_S = hand_on(b_M, b_S, b_k, b_g, b_cm, b_cs, f0n, e0n, p0n, k.dtype.element_ty,
                           PRECISION, UMIXED, ACCUMULATE)
    return b_M, b_S, m, s, n_qh, n_k, n_v, n_th, n_a, n_e


@triton.jit
def step_walk(q, k, v, theta, alpha, eta, gc, gn, hs, ss, hr, sr, qm, qs, gs, zs, p_done, c0,
              k0, bos, L, NT, i_h, o_c, o_d, m_d, o_s, m_s, b_M, b_S, b_w, b_b, scale, eps,
              D: tl.constexpr, H: tl.constexpr, BC: tl.constexpr, EVERY: tl.constexpr,
              PRECISION: tl.constexpr, MIXED: tl.constexpr, UMIXED: tl.constexpr,
              OMIXED: tl.constexpr, STORE: tl.constexpr, SCALED: tl.constexpr,
              PRODUCTS: tl.constexpr, STORE_G: tl.constexpr, STORE_Z: tl.constexpr,
              PREFETCH: tl.constexpr, GATES_AHEAD: tl.constexpr, ACCUMULATE: tl.constexpr,
              SCALES: tl.constexpr, SIGNAL: tl.constexpr):
    """The walk over walk_step from M0 = b_M, S0 = b_S: (M, S) at its end, the states stored
    at c0 + i_t (EVERY 1) or, once per segment of EVERY mini-batches, at k0 + i_t / EVERY;
    with SIGNAL (EVERY > 1) p_done set to g + 1 after segment g (minibatch.step_signal)."""
    m, s = 1., 1.  # the states' scales (SCALES)
    # mini-batch 0's rows (without PREFETCH walk_step loads each mini-batch's over them)
    b_qh, b_k, b_v, b_th, b_a, b_e = walk_rows(q, k, v, theta, alpha, eta, 0, bos, L, i_h, o_c,
                                               o_d, D, H, BC, PRODUCTS)
    if EVERY == 1:
        for i_t in range(NT):
            if STORE:
                store_states(hs, ss, hr, sr, ((c0 + i_t) * H + i_h).to(tl.int64), b_M, b_S,
                             o_d, m_d, o_s, m_s, D, SCALED)
            b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e = walk_step(
                q, k, v, theta, alpha, eta, gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h, o_c,
                o_d, m_d, b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e, b_w, b_b, scale, eps,
                D, H, BC, PRECISION, MIXED, UMIXED, OMIXED, PRODUCTS, STORE_G, STORE_Z,
                PREFETCH, GATES_AHEAD, ACCUMULATE, False)
    else:
        for i_g in range(tl.cdiv(NT, EVERY)):
            if STORE:
                store_states(hs, ss, hr, sr, ((k0 + i_g) * H + i_h).to(tl.int64), b_M * m,
                             b_S * s, o_d, m_d, o_s, m_s, D, SCALED)
            for i_t in range(i_g * EVERY, tl.minimum(NT, i_g * EVERY + EVERY)):
                b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e = walk_step(
                    q, k, v, theta, alpha, eta, gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h,
                    o_c, o_d, m_d, b_M, b_S, m, s, b_qh, b_k, b_v, b_th, b_a, b_e, b_w, b_b,
                    scale, eps, D, H, BC, PRECISION, MIXED, UMIXED, OMIXED, PRODUCTS, STORE_G,
                    False, PREFETCH, GATES_AHEAD, ACCUMULATE, SCALES)
            if SIGNAL:
                step_signal(p_done, i_g)
    return b_M * m, b_S * s


@triton.jit
def dot_rows(b_x, b_y, HALF: tl.constexpr, PRECISION: tl.constexpr):
    """b_x @ b_y^T of two row tiles holding values of the inputs' dtype HALF: one product of
    HALF operands (exact products, float32 sums), float32 ones at PRECISION."""
    if HALF == tl.float32:
        b_p = tl.dot(b_x, tl.trans(b_y), input_precision=PRECISION)
    else:
        b_p = tl.dot(b_x.to(HALF), tl.trans(b_y.to(HALF)))
    return b_p


@triton.jit
def pending_update(b_N, b_S, b_kp, b_g, b_cm, b_cs, HALF: tl.constexpr,
                   PRECISION: tl.constexpr, UMIXED: tl.constexpr):
    """The update ahead_step leaves to the next mini-batch: (N - K'^T (cM' o G'),
    S' - K'^T (cS' o G')), K', G' the mini-batch before's rows and gradients, cM', cS' its
    gates over the scales it handed on (zeros before the first mini-batch)."""
    b_kt = tl.trans(b_kp)
    return (dot_state_into(b_kt, -b_cm[:, None] * b_g, b_N, HALF, PRECISION, UMIXED),
            dot_state_into(b_kt, -b_cs[:, None] * b_g, b_S, HALF, PRECISION, UMIXED))


@triton.jit
def ahead_step(q, k, v, theta, alpha, eta, gc, gn, hs, ss, hr, sr, qm, qs, gs, zs, i_t, i_st,
               c0, bos, L, i_h, o_c, o_d, m_d, o_s, m_s, b_N, b_S, m, s, b_y, b_kp, b_gp,
               b_cmp, b_csp, b_qh, b_k, b_v, b_th, b_a, b_e, b_w, b_b, scale, eps,
               D: tl.constexpr, H: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
               MIXED: tl.constexpr, UMIXED: tl.constexpr, OMIXED: tl.constexpr,
               STORE: tl.constexpr, SCALED: tl.constexpr, PRODUCTS: tl.constexpr,
               STORE_G: tl.constexpr, STORE_Z: tl.constexpr, GATES_AHEAD: tl.constexpr,
               SCALES: tl.constexpr):
    """Mini-batch i_t of the walk with the product that takes the states one mini-batch ahead
    (chunk.WALK_AHEAD). Given N = f0'[n] M0' + p0'[n] S0' and S' = e0'[n] S0' of the mini-batch
    before (tiles, scales m, s as hand_on_scaled's under SCALES, else 1), its K', G', cM', cS'
    (pending_update) and Y = K N:

        M0, S0 = pending_update(..),   Z = K M0 = m (Y - (K K'^T) (cM' o G')),
        then this mini-batch's N, S', cM, cS and the next one's Y = K_next N,

    so that the chain from one G to the next holds one [C, C] x [C, D] product, the updates and
    the product with the state beside it. Stores as walk_step (states when i_st >= 0, at i_st);
    returns the carries and the next mini-batch's rows (loaded here)."""
    HALF: tl.constexpr = k.dtype.element_ty
    n_qh, n_k, n_v, n_th, n_a, n_e = walk_rows(q, k, v, theta, alpha, eta, i_t + 1, bos, L,
                                               i_h, o_c, o_d, D, H, BC, PRODUCTS)
    b_M, b_S = pending_update(b_N, b_S, b_kp, b_gp, b_cmp, b_csp, HALF, PRECISION, UMIXED)
    if STORE:
        if i_st >= 0:
            store_states(hs, ss, hr, sr, i_st, b_M * m, b_S * s, o_d, m_d, o_s, m_s, D, SCALED)
    m_t = i_t * BC + o_c < L
    row0 = (bos + i_t * BC) * H + i_h
    b_A = dot_rows(b_k, b_kp, HALF, PRECISION)
    b_z = tl.dot(b_A, -b_cmp[:, None] * b_gp, b_y, input_precision=PRECISION) * m
    b_g = grads_from_z(b_z, b_k, b_v, b_w, b_b, m_t, m_d, D, eps)
    b_cm, b_cs, f0n, e0n, p0n = stores_and_gates(
        gc, gn, qm, qs, gs, zs, i_t, c0, bos, L, i_h, row0, o_c, m_t, o_d, b_qh, b_M * m,
        b_S * s, b_z, b_g, b_th, b_a, b_e, scale, D, H, BC, PRECISION, OMIXED, PRODUCTS, STORE_G,
        STORE_Z, GATES_AHEAD)
    if SCALES:
        b_N, b_S, mf, se = handed_scales(b_M, b_S, m, s, f0n, e0n, p0n)
        b_cm, b_cs, m, s = b_cm / mf, b_cs / se, mf, se
    else:
        b_N, b_S = f0n * b_M + p0n * b_S, e0n * b_S
    b_y = dot_state(n_k, b_N, HALF, PRECISION, MIXED)
    return (b_N, b_S, m, s, b_y, b_k, b_g, b_cm, b_cs, n_qh, n_k, n_v, n_th, n_a, n_e)


@triton.jit
def ahead_walk(q, k, v, theta, alpha, eta, gc, gn, hs, ss, hr, sr, qm, qs, gs, zs, c0, k0,
               bos, L, NT, i_h, o_c, o_d, m_d, o_s, m_s, b_M, b_S, b_w, b_b, scale, eps,
               D: tl.constexpr, H: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
               EVERY: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
               UMIXED: tl.constexpr, OMIXED: tl.constexpr, STORE: tl.constexpr,
               SCALED: tl.constexpr, PRODUCTS: tl.constexpr, STORE_G: tl.constexpr,
               STORE_Z: tl.constexpr, GATES_AHEAD: tl.constexpr, SCALES: tl.constexpr):
    """The walk over ahead_step from M0 = b_M, S0 = b_S: (M, S) at its end, states stored at
    c0 + i_t (EVERY 1) or k0 + i_t / EVERY (the first mini-batch of each segment)."""
    b_qh, b_k, b_v, b_th, b_a, b_e = walk_rows(q, k, v, theta, alpha, eta, 0, bos, L, i_h, o_c,
                                               o_d, D, H, BC, PRODUCTS)
    m, s = 1., 1.
    b_kp = tl.zeros([BC, BD], dtype=tl.float32)
    b_gp = tl.zeros([BC, BD], dtype=tl.float32)
    b_cmp = tl.zeros([BC], dtype=tl.float32)
    b_csp = tl.zeros([BC], dtype=tl.float32)
    b_y = dot_state(b_k, b_M, k.dtype.element_ty, PRECISION, MIXED)
    for i_t in range(NT):
        i_st = (c0 + i_t) * H + i_h
        if EVERY > 1:
            i_st = tl.where(i_t % EVERY == 0, (k0 + i_t // EVERY) * H + i_h, -1)
        b_M, b_S, m, s, b_y, b_kp, b_gp, b_cmp, b_csp, b_qh, b_k, b_v, b_th, b_a, b_e = (
            ahead_step(q, k, v, theta, alpha, eta, gc, gn, hs, ss, hr, sr, qm, qs, gs, zs, i_t,
                       i_st.to(tl.int64), c0, bos, L, i_h, o_c, o_d, m_d, o_s, m_s, b_M, b_S,
                       m, s, b_y, b_kp, b_gp, b_cmp, b_csp, b_qh, b_k, b_v, b_th, b_a, b_e, b_w,
                       b_b, scale, eps, D, H, BC, PRECISION, MIXED, UMIXED, OMIXED, STORE,
                       SCALED, PRODUCTS, STORE_G, STORE_Z, GATES_AHEAD, SCALES))
    b_M, b_S = pending_update(b_M, b_S, b_kp, b_gp, b_cmp, b_csp, k.dtype.element_ty, PRECISION,
                              UMIXED)
    return b_M * m, b_S * s


@triton.jit
def walk_sequence(i_nh, q, k, v, w, b, theta, alpha, eta, gc, gn, h0, s0, ht, st, hs, ss, hr, sr,
                  qm, qs, gs, zs, progress, cu_seqlens, chunk_offsets, segment_offsets, scale,
                  eps, T, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
                  EVERY: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
                  UMIXED: tl.constexpr, OMIXED: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                  USE_INITIAL_MOMENTUM: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                  STORE_STATES: tl.constexpr, SCALED: tl.constexpr, PRODUCTS: tl.constexpr,
                  STORE_G: tl.constexpr, STORE_Z: tl.constexpr, PREFETCH: tl.constexpr,
                  GATES_AHEAD: tl.constexpr, ACCUMULATE: tl.constexpr, SCALES: tl.constexpr,
                  AHEAD: tl.constexpr, SIGNAL: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The walk of sequence and head i_nh (chunk_titans_linear_fwd_walk_kernel's); with SIGNAL
    (EVERY > 1, not AHEAD) progress[i_nh] set to g + 1 once segment g's G are stored."""
    if SIGNAL:  # a form that never signals would leave the programs that wait hanging
        tl.static_assert(EVERY > 1, "SIGNAL needs segments: EVERY > 1")
        tl.static_assert(not AHEAD, "SIGNAL is not given by ahead_walk")
    _, i_h, bos, L, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b = sequence_program(
        i_nh, w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC, IS_VARLEN)
    o_c = tl.arange(0, BC)
    b_M = start_square(h0, i_nh, o_s, m_s, D, BD, USE_INITIAL_STATE)
    b_S = start_square(s0, i_nh, o_s, m_s, D, BD, USE_INITIAL_MOMENTUM)
    k0 = c0  # the first segment's index among all (EVERY > 1)
    if EVERY > 1:
        k0 = walk_bounds(cu_seqlens, segment_offsets, i_nh // H, T, BC * EVERY, IS_VARLEN)[3]
    p_done = progress
    if SIGNAL:
        p_done = progress + i_nh
    if AHEAD:
        b_M, b_S = ahead_walk(
            q, k, v, theta, alpha, eta, gc, gn, hs, ss, hr, sr, qm, qs, gs, zs, c0, k0, bos, L, NT,
            i_h, o_c, o_d, m_d, o_s, m_s, b_M, b_S, b_w, b_b, scale, eps, D, H, BC, BD, EVERY,
            PRECISION, MIXED, UMIXED, OMIXED, STORE_STATES, SCALED, PRODUCTS, STORE_G, STORE_Z,
            GATES_AHEAD, SCALES)
    else:
        b_M, b_S = step_walk(
            q, k, v, theta, alpha, eta, gc, gn, hs, ss, hr, sr, qm, qs, gs, zs, p_done, c0, k0, bos,
            L, NT, i_h, o_c, o_d, m_d, o_s, m_s, b_M, b_S, b_w, b_b, scale, eps, D, H, BC, EVERY,
            PRECISION, MIXED, UMIXED, OMIXED, STORE_STATES, SCALED, PRODUCTS, STORE_G, STORE_Z,
            PREFETCH, GATES_AHEAD, ACCUMULATE, SCALES, SIGNAL)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * D * D + o_s, b_M, mask=m_s)
        tl.store(st + i_nh.to(tl.int64) * D * D + o_s, b_S, mask=m_s)


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
    SCALES: tl.constexpr, AHEAD: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence and head: M and S carried over the mini-batches (the module docstring's
    last line), storing with STORE_STATES the M0, S0 every EVERY-th mini-batch starts from
    (store_states; EVERY > 1: one state per segment of EVERY mini-batches, for the replay),
    with PRODUCTS Q~ M0, Q~ S0 (store_products), with STORE_G each mini-batch's G, with STORE_Z
    its Z; with PREFETCH the next mini-batch's rows loaded ahead (WALK_PREFETCH), with
    GATES_AHEAD the gates' part of the updates loaded from gc, gn (WALK_GATES_AHEAD); with
    AHEAD by ahead_walk (WALK_AHEAD)."""
    walk_sequence(
        tl.program_id(0), q, k, v, w, b, theta, alpha, eta, gc, gn, h0, s0, ht, st, hs, ss, hr,
        sr, qm, qs, gs, zs, None, cu_seqlens, chunk_offsets, segment_offsets, scale, eps, T, H, D,
        BD, BC, EVERY, PRECISION, MIXED, UMIXED, OMIXED, USE_INITIAL_STATE,
        USE_INITIAL_MOMENTUM, STORE_FINAL_STATE, STORE_STATES, SCALED, PRODUCTS, STORE_G,
        STORE_Z, PREFETCH, GATES_AHEAD, ACCUMULATE, SCALES, AHEAD, False, IS_VARLEN)
