"""chunk_titans_linear's backward (docs/operators.md section 4): one program per (sequence,
head) walks the mini-batches from last to first, carrying the gradients dM, dS of the memory
and momentum a mini-batch hands on, and goes back through the forward of kernels/titans/chunk.py
(its module docstring has the equations) from the M0, S0 the forward stored for it:

    O = U + w LN(U) + b           dU = dO + LN's backward of w dO
    U = f0 (Q~ M0) + p0 (Q~ S0) - W G,   W = (P theta^T) o (Q~ K^T)
        dW = -tril(dU G^T): dP = dW o theta^T o B, dB = dW o P o theta^T, dtheta += colsum(dW o P o B)
    M' = f0[n] M0 + p0[n] S0 - K^T (cM o G),   S' = e0[n] S0 - K^T (cS o G),
        cM = P[n] theta, cS = E[n] theta:  dG -= cM o (K dM') + cS o (K dS'),  dK -= (cM o G) dM'^T + ...
    G = 2 ln_recon_grad(Z, V - K),  Z = K M0     (the LayerNorm gradient's own backward)
    P = F E, p0 = F e0, F and E the segment products of 1 - alpha and eta:
        their gradients collected into dF, df0, dE, de0, then to the factors
        (stages.segment_products_bwd: no factor divided by, zero factors included).

dw and db are summed per (sequence, head), then over sequences on the host. Rows past a
sequence load as zeros (G 0, factors 1, theta 0) and store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.layernorm import layer_norm_bwd_rows, layer_norm_rows, ln_recon_grad_bwd_rows
from kernels.common.minibatch import load_square, start_square, walk_program
from kernels.common.utils import chunk_layout, load_rows, store_rows
from kernels.titans.stages import (mini_batch_rows, recon_grads, segment_products,
                                   segment_products_bwd)

__all__ = ["chunk_backward"]

# The walk's software pipelining: at Triton's default 3 stages ptxas put its shared memory at
# 311,296 bytes for 64-token mini-batches at D = 64 (bfloat16), over sm_90's 232,448
# (tests/test_compile.py); 1 stage stages no load ahead.
BWD_STAGES = 1


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _row(b_x, last):
    """Row n (``last`` marks it) of a [C, C] matrix, as a [C] vector."""
    return tl.sum(tl.where(last[:, None], b_x, 0.), 0)


@triton.jit
def _outputs_bwd(b_q, b_k, b_g, b_do, b_M, b_S, b_th, b_F, b_f0, b_E, b_e0, b_w, b_b, o_c, m_d,
                 D: tl.constexpr, eps, PRECISION: tl.constexpr):
    """Back through U and O: (dU, dQ~, dK's B part, dG's U part, dP, dp0, df0, dtheta's U
    part, dw, db); U recomputed."""
    b_P = _dot(b_F, b_E, PRECISION)
    b_p0 = tl.sum(b_F * b_e0[None, :], 1)
    b_B = _dot(b_q, tl.trans(b_k), PRECISION)
    b_W = b_P * b_th[None, :] * b_B
    b_qm = _dot(b_q, b_M, PRECISION)
    b_qs = _dot(b_q, b_S, PRECISION)
    b_u = b_f0[:, None] * b_qm + b_p0[:, None] * b_qs - _dot(b_W, b_g, PRECISION)
    b_xu, b_su = layer_norm_rows(b_u, m_d, D, eps)
    b_dw = tl.sum(b_do * b_xu, 0)
    b_db = tl.sum(b_do, 0)
    b_du = b_do + layer_norm_bwd_rows(b_w[None, :] * b_do, b_xu, b_su, m_d, D)
    causal = o_c[:, None] >= o_c[None, :]
    b_dW = tl.where(causal, -_dot(b_du, tl.trans(b_g), PRECISION), 0.)
    b_dB = b_dW * b_P * b_th[None, :]
    b_dq = (_dot(b_f0[:, None] * b_du, tl.trans(b_M), PRECISION)
            + _dot(b_p0[:, None] * b_du, tl.trans(b_S), PRECISION) + _dot(b_dB, b_k, PRECISION))
    return (b_du, b_dq, _dot(tl.trans(b_dB), b_q, PRECISION),
            -_dot(tl.trans(b_W), b_du, PRECISION), b_dW * b_th[None, :] * b_B, b_p0,
            tl.sum(b_du * b_qs, 1), tl.sum(b_du * b_qm, 1), tl.sum(b_dW * b_P * b_B, 0), b_dw,
            b_db)


@triton.jit
def _gates_bwd(b_dP, b_dp0, b_df0, b_dpn, b_dp0n, b_den, b_df0n, b_de0n, b_F, b_E, b_e0, b_Fx,
               b_f0x, b_Ex, b_e0x, last, o_c, PRECISION: tl.constexpr):
    """(d(1 - alpha), d eta) [C] from the gradients of P = F E, p0 = F e0 and of row n's
    P[n] = F[n] E, p0[n] = F[n] . e0, E[n], f0[n], e0[n]."""
    causal = o_c[:, None] >= o_c[None, :]
    b_fn = _row(b_F, last)
    b_dfn = tl.sum(b_E * b_dpn[None, :], 1) + b_dp0n * b_e0
    b_dF = (_dot(b_dP, tl.trans(b_E), PRECISION) + b_dp0[:, None] * b_e0[None, :]
            + tl.where(last[:, None], b_dfn[None, :], 0.))
    b_dE = (_dot(tl.trans(b_F), b_dP, PRECISION) + b_fn[:, None] * b_dpn[None, :]
            + tl.where(last[:, None], b_den[None, :], 0.))
    b_df0 += tl.where(last, b_df0n, 0.)
    b_de0 = tl.sum(b_F * b_dp0[:, None], 0) + b_dp0n * b_fn + tl.where(last, b_de0n, 0.)
    b_da = segment_products_bwd(tl.where(causal, b_dF, 0.), b_df0, b_F, b_Fx, b_f0x, PRECISION)
    b_de = segment_products_bwd(tl.where(causal, b_dE, 0.), b_de0, b_E, b_Ex, b_e0x, PRECISION)
    return b_da, b_de


@triton.jit
def _updates_bwd(b_k, b_g, b_M, b_S, b_dM, b_dS, b_th, b_F, b_E, b_e0, b_f0, last,
                 PRECISION: tl.constexpr):
    """Back through M' and S' (the module docstring): (dG's part, dK's part, dtheta's part,
    dM0's part, dS0's part, dP[n], dp0[n], dE[n], df0[n], de0[n])."""
    b_fn = _row(b_F, last)
    b_en = _row(b_E, last)
    b_pn = tl.sum(b_fn[:, None] * b_E, 0)
    f0n = tl.sum(tl.where(last, b_f0, 0.), 0)
    e0n = tl.sum(tl.where(last, b_e0, 0.), 0)
    p0n = tl.sum(b_fn * b_e0, 0)
    b_rm = _dot(b_k, b_dM, PRECISION)
    b_rs = _dot(b_k, b_dS, PRECISION)
    b_cm, b_cs = b_pn * b_th, b_en * b_th
    b_dg = -(b_cm[:, None] * b_rm + b_cs[:, None] * b_rs)
    b_dcm = -tl.sum(b_g * b_rm, 1)
    b_dcs = -tl.sum(b_g * b_rs, 1)
    b_dk = -(_dot(b_cm[:, None] * b_g, tl.trans(b_dM), PRECISION)
             + _dot(b_cs[:, None] * b_g, tl.trans(b_dS), PRECISION))
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
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
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
        b_g = recon_grads(b_k, b_v, b_M, b_w, b_b, m_t, m_d, D, eps, PRECISION)
        b_F, b_f0, b_Fx, b_f0x = segment_products(b_a, o_c)
        b_E, b_e0, b_Ex, b_e0x = segment_products(b_e, o_c)
        (b_du, b_dq, b_dk, b_dg, b_dP, b_p0, b_dp0, b_df0, b_dth, b_dw,
         b_db) = _outputs_bwd(b_q, b_k, b_g, b_do, b_M, b_S, b_th, b_F, b_f0, b_E, b_e0, b_w,
                              b_b, o_c, m_d, D, eps, PRECISION)
        b_dwa += b_dw
        b_dba += b_db
        (b_dg2, b_dk2, b_dth2, b_dM0, b_dS0, b_dpn, b_dp0n, b_den, b_df0n,
         b_de0n) = _updates_bwd(b_k, b_g, b_M, b_S, b_dM, b_dS, b_th, b_F, b_E, b_e0, b_f0, last,
                                PRECISION)
        # G = 2 ln_recon_grad(Z, V - K), Z = K M0
        b_z = _dot(b_k, b_M, PRECISION)
        b_dz, b_dt, b_dw, b_db, _ = ln_recon_grad_bwd_rows(
            tl.where(m_t[:, None], 2. * (b_dg + b_dg2), 0.), b_z, b_v - b_k, b_w, b_b, m_d, D,
            eps)
        b_dwa += b_dw
        b_dba += b_db
        b_dM = b_dM0 + _dot(tl.trans(b_q), b_f0[:, None] * b_du, PRECISION) + _dot(
            tl.trans(b_k), b_dz, PRECISION)
        b_dS = b_dS0 + _dot(tl.trans(b_q), b_p0[:, None] * b_du, PRECISION)
        b_da, b_de = _gates_bwd(b_dP, b_dp0, b_df0, b_dpn, b_dp0n, b_den, b_df0n, b_de0n, b_F,
                                b_E, b_e0, b_Fx, b_f0x, b_Ex, b_e0x, last, o_c, PRECISION)
        store_rows(dq + row0 * D, b_dq * scale, o_c, m_t, o_d, D, H)
        store_rows(dk + row0 * D, b_dk + b_dk2 + _dot(b_dz, tl.trans(b_M), PRECISION) - b_dt,
                   o_c, m_t, o_d, D, H)
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


def chunk_backward(q, k, v, w, b, theta, alpha, eta, hs, ss, initial, do, dht, dst, scale, eps,
                   chunk_size, cu_seqlens, meta):
    """(dq, dk, dv, dw, db, dtheta, dalpha, deta, d initial M or None, d initial S or None),
    from the states each mini-batch started with (hs, ss); ``initial``: whether the call had an
    initial memory or momentum."""
    B, T, H, D = q.shape
    N, _, _, chunk_offsets = chunk_layout(B, T, cu_seqlens, chunk_size)
    f32 = {"dtype": torch.float32, "device": q.device}
    if (dht is None) != (dst is None):
        dht = dht if dht is not None else torch.zeros(N, H, D, D, **f32)
        dst = dst if dst is not None else torch.zeros(N, H, D, D, **f32)
    dht, dst = (None if x is None else x.contiguous().float() for x in (dht, dst))
    dq, dk, dv, dtheta, dalpha, deta = (torch.empty_like(x)
                                        for x in (q, k, v, theta, alpha, eta))
    dw, db = torch.empty(N, H, D, **f32), torch.empty(N, H, D, **f32)
    dh0, ds0 = ((torch.empty(N, H, D, D, **f32), torch.empty(N, H, D, D, **f32)) if initial
                else (None, None))
    chunk_titans_linear_bwd_kernel[(N * H,)](
        q, k, v, w, b, theta, alpha, eta, do.contiguous().to(v.dtype), hs, ss, dht, dst, dq,
        dk, dv, dtheta, dalpha, deta, dw, db, dh0, ds0, cu_seqlens, chunk_offsets, scale,
        float(eps), T, num_stages=BWD_STAGES, **meta)
    return (dq, dk, dv, dw.sum(0).to(w.dtype), db.sum(0).to(b.dtype), dtheta, dalpha, deta, dh0,
            ds0)
