"""chunk_titans_linear's backward in one kernel (chunk.SPLIT_BACKWARD False): one program per
(sequence, head) walks the mini-batches from last to first, carrying the gradients dM, dS of
the memory and momentum a mini-batch hands on, and goes back through the forward of
kernels/titans/chunk.py (its module docstring has the equations) from the M0, S0 the forward
stored for it:

    O = U + w LN(U) + b           dU = dO + LN's backward of w dO
    U = f0 (Q~ M0) + p0 (Q~ S0) - W G,   W = (P theta^T) o (Q~ K^T)      (stages.outputs_bwd)
    M' = f0[n] M0 + p0[n] S0 - K^T (cM o G),   S' = e0[n] S0 - K^T (cS o G),
        cM = P[n] theta, cS = E[n] theta                                 (updates_bwd below)
    G = 2 ln_recon_grad(Z, V - K),  Z = K M0     (the LayerNorm gradient's own backward)
    P = F E, p0 = F e0, F and E the segment products of 1 - alpha and eta  (stages.gates_bwd)

Every product of the chain is in the walk, so it is several times slower than the split
backward of kernels/titans/chunk_bwd.py; it is the form whose bfloat16, float16 and float32
results `harness check titans --family tiling` passed on an H200 (2026-12-04), and the
default until the split one's are (reports/titans.md). dw and db are summed per (sequence,
head), then over sequences on the host. Rows past a sequence load as zeros (G 0, factors 1,
theta 0) and store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.layernorm import ln_recon_grad_bwd_rows
from kernels.common.minibatch import (load_square, reload_rows, reload_square, start_square,
                                      walk_program)
from kernels.common.utils import chunk_layout, load_rows, store_rows
from kernels.titans.chunk_bwd import final_state_grads
from kernels.titans.stages import (dot_at, dq_state, gates_bwd, local_meta, mini_batch_rows,
                                   outputs_bwd, recon_grads, row_of, segment_products)

__all__ = ["fused_backward"]

# The walk's software pipelining: at Triton's default 3 stages ptxas put its shared memory at
# 311,296 bytes for 64-token mini-batches at D = 64 (bfloat16), over sm_90's 232,448
# (tests/test_compile.py); 1 stage stages no load ahead.
BWD_STAGES = 1

# The walk loads M0, S0, Q~ and K again for its last products when a mini-batch's [C, D] tile
# holds more than this many values (32- and 64-token mini-batches at D > 64, and 64-token ones
# at D = 64; kernels/common/minibatch.py, reload_square).
RELOAD_TILE = tl.constexpr(16 * 128)


@triton.jit
def updates_bwd(b_k, b_g, b_M, b_S, b_dM, b_dS, b_th, b_F, b_E, b_e0, b_f0, last,
                PRECISION: tl.constexpr):
    """Back through M' and S' (the module docstring): (dG's part, dK's part, dtheta's part,
    dM0's part, dS0's part, dP[n], dp0[n], dE[n], df0[n], de0[n])."""
    b_fn = row_of(b_F, last)
    b_en = row_of(b_E, last)
    b_pn = tl.sum(b_fn[:, None] * b_E, 0)
    f0n = tl.sum(tl.where(last, b_f0, 0.), 0)
    e0n = tl.sum(tl.where(last, b_e0, 0.), 0)
    p0n = tl.sum(b_fn * b_e0, 0)
    b_cm, b_cs = b_pn * b_th, b_en * b_th
    # dM's products, then dS's: one state's operand copy in shared memory at a time
    b_rm = dot_at(b_k, b_dM, PRECISION)
    b_dk = -dot_at(b_cm[:, None] * b_g, tl.trans(b_dM), PRECISION)
    b_rs = dot_at(b_k, b_dS, PRECISION)
    b_dk -= dot_at(b_cs[:, None] * b_g, tl.trans(b_dS), PRECISION)
    b_dg = -(b_cm[:, None] * b_rm + b_cs[:, None] * b_rs)
    b_dcm = -tl.sum(b_g * b_rm, 1)
    b_dcs = -tl.sum(b_g * b_rs, 1)
    return (b_dg, b_dk, b_dcm * b_pn + b_dcs * b_en, f0n * b_dM, p0n * b_dM + e0n * b_dS,
            b_dcm * b_th, tl.sum(tl.sum(b_dM * b_S, 1), 0), b_dcs * b_th,
            tl.sum(tl.sum(b_dM * b_M, 1), 0), tl.sum(tl.sum(b_dS * b_S, 1), 0))


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['dh0'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_bwd_kernel(
    q, k, v, w, b, theta, alpha, eta, do, hs, ss, dht, dst, dq, dk, dv, dtheta, dalpha, deta,
    dw, db, dh0, ds0, cu_seqlens, chunk_offsets, scale, eps, T, H: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
    MIXED: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence and head: the mini-batches from last to first (module docstring)."""
    i_nh, i_h, bos, L, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b = walk_program(
        w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC, IS_VARLEN)
    o_c = tl.arange(0, BC)
    b_dM = start_square(dht, i_nh, o_s, m_s, D, BD, USE_FINAL_STATE_GRADIENT)
    b_dS = start_square(dst, i_nh, o_s, m_s, D, BD, USE_FINAL_STATE_GRADIENT)
    b_dwa = tl.zeros([BD], dtype=tl.float32)
    b_dba = tl.zeros([BD], dtype=tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        i_s = (c0 + i_t) * H + i_h
        row0 = (bos + i_t * BC) * H + i_h
        m_t = i_t * BC + o_c < L
        last = o_c == tl.minimum(BC, L - i_t * BC) - 1
        b_M = load_square(hs, i_s, o_s, m_s, D)
        b_S = load_square(ss, i_s, o_s, m_s, D)
        b_q, b_k, b_v, b_th, b_a, b_e = mini_batch_rows(q, k, v, theta, alpha, eta, row0, o_c,
                                                        m_t, o_d, scale, D, H)
        b_do = load_rows(do + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
        b_g, b_z = recon_grads(b_k, b_v, b_M, b_w, b_b, m_t, m_d, D, eps, k.dtype.element_ty,
                               PRECISION, MIXED)
        b_F, b_f0, b_Fx, b_f0x = segment_products(b_a, o_c)
        b_E, b_e0, b_Ex, b_e0x = segment_products(b_e, o_c)
        (b_du, b_dq, b_dk, b_dg, b_dP, b_p0, b_dp0, b_df0, b_dth, b_dw,
         b_db) = outputs_bwd(b_q, b_k, b_g, b_do, b_M, b_S, b_th, b_F, b_f0, b_E, b_e0, b_w,
                             b_b, o_c, m_d, D, eps, PRECISION)
        b_dwa += b_dw
        b_dba += b_db
        (b_dg2, b_dk2, b_dth2, b_dM0, b_dS0, b_dpn, b_dp0n, b_den, b_df0n,
         b_de0n) = updates_bwd(b_k, b_g, b_M, b_S, b_dM, b_dS, b_th, b_F, b_E, b_e0, b_f0, last,
                               PRECISION)
        # G = 2 ln_recon_grad(Z, V - K), Z = K M0
        b_dz, b_dt, b_dw, b_db, _ = ln_recon_grad_bwd_rows(
            tl.where(m_t[:, None], 2. * (b_dg + b_dg2), 0.), b_z, b_v - b_k, b_w, b_b, m_d, D,
            eps)
        b_dwa += b_dw
        b_dba += b_db
        # the products with Q~, K, M0 and S0 from here on take them loaded again for the
        # widest tiles (RELOAD_TILE), M0's and S0's one after the other
        b_q = reload_rows(b_q, q + row0 * D, o_c, m_t, o_d, scale, D, H, RELOAD_TILE)
        b_k = reload_rows(b_k, k + row0 * D, o_c, m_t, o_d, 1., D, H, RELOAD_TILE)
        b_dM = b_dM0 + dot_at(tl.trans(b_q), b_f0[:, None] * b_du, PRECISION) + dot_at(
            tl.trans(b_k), b_dz, PRECISION)
        b_dS = b_dS0 + dot_at(tl.trans(b_q), b_p0[:, None] * b_du, PRECISION)
        b_da, b_de = gates_bwd(b_dP, b_dp0, b_df0, b_dpn, b_dp0n, b_den, b_df0n, b_de0n, b_F,
                               b_E, b_e0, b_Fx, b_f0x, b_Ex, b_e0x, last, o_c, PRECISION)
        b_M = reload_square(b_M, b_q, hs, i_s, o_s, m_s, D, RELOAD_TILE)
        b_dq += dq_state(b_du, b_f0, b_M, PRECISION)
        b_dk += b_dk2 + dot_at(b_dz, tl.trans(b_M), PRECISION) - b_dt
        b_S = reload_square(b_S, b_q, ss, i_s, o_s, m_s, D, RELOAD_TILE)
        b_dq += dq_state(b_du, b_p0, b_S, PRECISION)
        store_rows(dq + row0 * D, b_dq * scale, o_c, m_t, o_d, D, H)
        store_rows(dk + row0 * D, b_dk, o_c, m_t, o_d, D, H)
        store_rows(dv + row0 * D, b_dt, o_c, m_t, o_d, D, H)
        p = row0 + o_c * H
        tl.store(dtheta + p, (b_dth + b_dth2).to(dtheta.dtype.element_ty), mask=m_t)
        tl.store(dalpha + p, (-b_da).to(dalpha.dtype.element_ty), mask=m_t)
        tl.store(deta + p, b_de.to(deta.dtype.element_ty), mask=m_t)
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * D * D + o_s, b_dM, mask=m_s)
        tl.store(ds0 + i_nh.to(tl.int64) * D * D + o_s, b_dS, mask=m_s)
    tl.store(dw + i_nh * D + o_d, b_dwa, mask=m_d)
    tl.store(db + i_nh * D + o_d, b_dba, mask=m_d)


def fused_backward(q, k, v, w, b, theta, alpha, eta, hs, ss, initial, do, dht, dst, scale, eps,
                   chunk_size, cu_seqlens, meta):
    """chunk_bwd.chunk_backward's contract, in one kernel."""
    B, T, H, D = q.shape
    N, _, _, chunk_offsets = chunk_layout(B, T, cu_seqlens, chunk_size)
    f32 = {"dtype": torch.float32, "device": q.device}
    dht, dst = final_state_grads(dht, dst, N, H, D, q.device)
    dq, dk, dv, dtheta, dalpha, deta = (torch.empty_like(x)
                                        for x in (q, k, v, theta, alpha, eta))
    dw, db = torch.empty(N, H, D, **f32), torch.empty(N, H, D, **f32)
    dh0, ds0 = ((torch.empty(N, H, D, D, **f32), torch.empty(N, H, D, D, **f32)) if initial
                else (None, None))
    chunk_titans_linear_bwd_kernel[(N * H,)](
        q, k, v, w, b, theta, alpha, eta, do.contiguous().to(v.dtype), hs, ss, dht, dst, dq,
        dk, dv, dtheta, dalpha, deta, dw, db, dh0, ds0, cu_seqlens, chunk_offsets, scale,
        float(eps), T, num_stages=BWD_STAGES, **local_meta(meta))
    return (dq, dk, dv, dw.sum(0).to(w.dtype), db.sum(0).to(b.dtype), dtheta, dalpha, deta, dh0,
            ds0)
