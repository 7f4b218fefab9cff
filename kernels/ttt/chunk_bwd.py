"""chunk_ttt_linear's backward (docs/operators.md section 3), in three kernels.

Of a mini-batch's gradients (fused_chunk.py's module docstring has the forward, reports/ttt.md
the backward's equations) only dG -> dZ -> dW depends on the gradients dW', dhb' of the weights
the mini-batch hands on to the later ones. The rest comes from a parallel kernel first, so that
the sequential walk is as short as the forward's (K dW', the LayerNorm gradient's backward,
K^T dZ), and dK's dW-side terms from a parallel kernel last:

1. ``chunk_ttt_linear_bwd_local_kernel``, one program per (mini-batch, head), from the W, hb
   the mini-batch starts with: Z, G, U recomputed, then

       dU = dO + LN's backward of w dO,     dAG = -eta dU,     dA = tril(dAG G^T)
       dQ~ = dU W^T + dA K  (final),        dK_A = dA^T Q~,    deta_U = -rowsum(dU * (A G))
       dG_U = A^T dAG,                      dw, db of the output's LayerNorm

   storing Z, dU, dG_U, dK_A, deta_U (float32).
2. ``chunk_ttt_linear_bwd_walk_kernel``, one program per (sequence, head), mini-batches from
   last to first, dW' and dhb' on chip; stores dW' per mini-batch (D^2 float32 values, as the
   forward stores W), then

       dG = dG_U - eta_last (K dW' + 1 dhb'),     deta_last = -sum((K dW') * G) - dhb' . (1^T G)
       dZ, dV, dw, db = the backward of G = ln_recon_grad(Z, V - K)    (dV = dT: V enters as T)
       dW = dW' + Q~^T dU + K^T dZ,               dhb = dhb' + 1^T dU + 1^T dZ

   and writes G over dU, dZ over dG_U, dK_A - dV over dK_A.
3. ``chunk_ttt_linear_bwd_dk_kernel``, one program per (mini-batch, head):

       dK = dK_A - dV - eta_last G dW'^T + dZ W^T,     deta = deta_U (+ deta_last on the last
       real row)

Rows past a sequence load as zeros and store nothing; their G is 0, as in the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.layernorm import layer_norm_bwd_rows, layer_norm_rows, ln_recon_grad_bwd_rows
from kernels.common.minibatch import dot_state, mini_batch_program, reload_rows, walk_program
from kernels.common.utils import chunk_layout, load_rows, store_rows
from kernels.ttt.fused_chunk import (RELOAD_TILE, final_state_grads, launch_meta, load_state,
                                     mini_batch_rows, recon_grads, start_state, states_dtype,
                                     walk_meta, walk_mixed)

__all__ = ["chunk_backward"]

# The walk's software pipelining (its loop's loads staged ahead): at 3 stages ptxas put its
# shared memory over sm_90's 232,448 bytes (D = 128 with 32-token mini-batches: 262,144 in
# bfloat16, 278,784 in float32); at 2, 196,608 and 180,352 (python tools/kernel_registers.py
# ttt --impl chunk --case cs32-d128,cs64-d64). With PREFETCH the loads are ahead already: 1
# stage took 2896 µs against 2947 at 2 (H200, float16, D=64, T=8192, "split"), not yet timed
# at D = 128.
WALK_STAGES = 2
# dK's dW'-side term -eta_last G dW'^T: in the last parallel kernel, from dW' stored per
# mini-batch (D^2 float32 values each: 1 GB at B = 2, H = 16, D = 64, T = 32768), or in the
# walk (one more product a mini-batch there, off its dependent chain; nothing stored). On an
# H200 (float16, B=2, H=16, D=64, T=8192, "split" with prefetch) the walk took 727 µs more and
# the last kernel 130 less: +12% on the whole fwd+bwd, so False.
DK_IN_WALK = False
# The walk's loads: the next mini-batch's eight row tiles loaded before this one's products
# (True), or each mini-batch's when it starts (False), as fused_chunk.WALK_PREFETCH for the
# forward walk. On an H200 (float16, B=2, H=16, D=64, T=8192) 3269 -> 2947 µs under
# WALK_MIXED "split"; under None (three TF32 passes) it cost 6% (4276 -> 4532).
PREFETCH = True


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_ttt_linear_bwd_local_kernel(
    q, k, v, w, b, eta, do, hs, hbs, dq, z, du, dgu, dka, deu, dw, db, cu_seqlens,
    chunk_indices, scale, eps, T, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BC: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: the gradients that do not depend on the later mini-batches
    (step 1 of the module docstring)."""
    i_s, row0, o_c, m_t, n_t, o_d, m_d, o_s, m_s, b_w, b_b = mini_batch_program(
        w, b, cu_seqlens, chunk_indices, T, H, D, BD, BC, IS_VARLEN)
    b_W, b_hb = load_state(hs, hbs, i_s, o_s, m_s, o_d, m_d, D)
    b_q, b_k, b_v, b_e = mini_batch_rows(q, k, v, eta, row0, o_c, m_t, o_d, scale, D, H)
    b_do = load_rows(do + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_g, b_z = recon_grads(b_k, b_v, b_W, b_hb, b_w, b_b, m_t, m_d, D, eps, k.dtype.element_ty,
                           PRECISION, MIXED)
    causal = o_c[:, None] >= o_c[None, :]
    b_A = tl.where(causal, tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) + 1., 0.)
    b_ag = tl.dot(b_A, b_g, input_precision=PRECISION)
    b_u = tl.dot(b_q, b_W, input_precision=PRECISION) + b_hb[None, :] - b_e[:, None] * b_ag
    b_xu, b_su = layer_norm_rows(b_u, m_d, D, eps)
    # O = U + w * LN(U) + b
    tl.store(dw + i_s * D + o_d, tl.sum(b_do * b_xu, 0), mask=m_d)
    tl.store(db + i_s * D + o_d, tl.sum(b_do, 0), mask=m_d)
    b_du = b_do + layer_norm_bwd_rows(b_w[None, :] * b_do, b_xu, b_su, m_d, D)
    # U = Q~ W + 1 hb - eta (A G),  A = tril(Q~ K^T + 1)
    b_dag = -b_e[:, None] * b_du
    b_dA = tl.where(causal, tl.dot(b_dag, tl.trans(b_g), input_precision=PRECISION), 0.)
    b_dq = (tl.dot(b_du, tl.trans(b_W), input_precision=PRECISION)
            + tl.dot(b_dA, b_k, input_precision=PRECISION))
    store_rows(dq + row0 * D, b_dq * scale, o_c, m_t, o_d, D, H)
    b_q = reload_rows(b_q, q + row0 * D, o_c, m_t, o_d, scale, D, H, RELOAD_TILE)
    store_rows(dka + row0 * D, tl.dot(tl.trans(b_dA), b_q, input_precision=PRECISION),
               o_c, m_t, o_d, D, H)
    store_rows(dgu + row0 * D, tl.dot(tl.trans(b_A), b_dag, input_precision=PRECISION),
               o_c, m_t, o_d, D, H)
    store_rows(z + row0 * D, b_z, o_c, m_t, o_d, D, H)
    store_rows(du + row0 * D, b_du, o_c, m_t, o_d, D, H)
    tl.store(deu + row0 + o_c * H, -tl.sum(b_du * b_ag, 1), mask=m_t)


@triton.jit
def walk_rows(q, k, v, eta, z, du, dgu, dka, i_t, bos, L, i_h, o_c, o_d, D: tl.constexpr,
              H: tl.constexpr, BC: tl.constexpr):
    """Mini-batch i_t's rows as the walk takes them, float32, zeros past the sequence and for
    i_t < 0: (Q unscaled, K, V, eta, Z, dU, dG_U, dK_A)."""
    row0 = (bos + i_t * BC) * H + i_h
    m_t = (i_t * BC + o_c < L) & (i_t >= 0)
    return (load_rows(q + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            load_rows(k + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            load_rows(v + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            tl.load(eta + row0 + o_c * H, mask=m_t, other=0.).to(tl.float32),
            load_rows(z + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(du + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(dgu + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(dka + row0 * D, o_c, m_t, o_d, D, H))


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['dh0'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_ttt_linear_bwd_walk_kernel(
    q, k, v, w, b, eta, z, du, dgu, dka, dv, dhs, delast, dht, dhbt, dh0, dhb0, dw, db,
    cu_seqlens, chunk_offsets, scale, eps, T, H: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    DK_IN_WALK: tl.constexpr, PREFETCH: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence and head: dW', dhb' carried from the last mini-batch to the first (step 2
    of the module docstring); dw, db of G's LayerNorm per (sequence, head). With DK_IN_WALK,
    dK's dW'-side term is added here instead of dW' and G being stored; with PREFETCH the
    next mini-batch's rows are loaded ahead."""
    i_nh, i_h, bos, L, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b = walk_program(
        w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC, IS_VARLEN)
    o_c = tl.arange(0, BC)
    b_dW, b_dhb = start_state(dht, dhbt, i_nh, o_s, m_s, o_d, m_d, D, BD,
                              USE_FINAL_STATE_GRADIENT)
    b_dwa = tl.zeros([BD], dtype=tl.float32)
    b_dba = tl.zeros([BD], dtype=tl.float32)
    if PREFETCH:
        b_qr, b_k, b_v, b_e, b_z, b_du, b_dgu, b_dka = walk_rows(
            q, k, v, eta, z, du, dgu, dka, NT - 1, bos, L, i_h, o_c, o_d, D, H, BC)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        i_s = (c0 + i_t) * H + i_h
        if not DK_IN_WALK:
            tl.store(dhs + i_s * D * D + o_s, b_dW, mask=m_s)
        row0 = (bos + i_t * BC) * H + i_h
        m_t = i_t * BC + o_c < L
        if PREFETCH:  # mini-batch i_t - 1's
            n_qr, n_k, n_v, n_e, n_z, n_du, n_dgu, n_dka = walk_rows(
                q, k, v, eta, z, du, dgu, dka, i_t - 1, bos, L, i_h, o_c, o_d, D, H, BC)
        else:
            b_qr, b_k, b_v, b_e, b_z, b_du, b_dgu, b_dka = walk_rows(
                q, k, v, eta, z, du, dgu, dka, i_t, bos, L, i_h, o_c, o_d, D, H, BC)
        e_last = tl.sum(tl.where(o_c == tl.minimum(BC, L - i_t * BC) - 1, b_e, 0.), 0)
        # W' = W - e_L K^T G, hb' = hb - e_L 1^T G
        b_kdw = dot_state(b_k, b_dW, k.dtype.element_ty, PRECISION, MIXED)
        b_dg = b_dgu - e_last * (b_kdw + b_dhb[None, :])
        # G = ln_recon_grad(Z, V - K)
        b_dz, b_dt, b_dw, b_db, b_g = ln_recon_grad_bwd_rows(
            tl.where(m_t[:, None], b_dg, 0.), b_z, b_v - b_k, b_w, b_b, m_d, D, eps)
        b_g = tl.where(m_t[:, None], b_g, 0.)
        tl.store(delast + i_s, -(tl.sum(tl.sum(b_kdw * b_g, 1), 0)
                                 + tl.sum(b_dhb * tl.sum(b_g, 0), 0)))
        b_dka -= b_dt
        if DK_IN_WALK:
            b_dka -= e_last * tl.dot(b_g, tl.trans(b_dW), input_precision=PRECISION)
        else:
            store_rows(du + row0 * D, b_g, o_c, m_t, o_d, D, H)
        # Z = K W + 1 hb, U = Q~ W + 1 hb - ...
        b_dW += (scale * dot_state(tl.trans(b_qr), b_du, k.dtype.element_ty, PRECISION, MIXED)
                 + dot_state(tl.trans(b_k), b_dz, k.dtype.element_ty, PRECISION, MIXED))
        b_dhb += tl.sum(b_du, 0) + tl.sum(b_dz, 0)
        b_dwa += b_dw
        b_dba += b_db
        store_rows(dgu + row0 * D, b_dz, o_c, m_t, o_d, D, H)
        store_rows(dv + row0 * D, b_dt, o_c, m_t, o_d, D, H)
        store_rows(dka + row0 * D, b_dka, o_c, m_t, o_d, D, H)
        if PREFETCH:
            b_qr, b_k, b_v, b_e, b_z, b_du, b_dgu, b_dka = (n_qr, n_k, n_v, n_e, n_z, n_du, n_dgu,
                                                            n_dka)
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * D * D + o_s, b_dW, mask=m_s)
        tl.store(dhb0 + i_nh.to(tl.int64) * D + o_d, b_dhb, mask=m_d)
    tl.store(dw + i_nh * D + o_d, b_dwa, mask=m_d)
    tl.store(db + i_nh * D + o_d, b_dba, mask=m_d)


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_ttt_linear_bwd_dk_kernel(
    w, b, eta, hs, dhs, du, dgu, dka, deu, delast, dk, deta, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr, DK_IN_WALK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: dK and deta (step 3 of the module docstring); dgu holds dZ by
    now, and du G unless the walk took dK's dW'-side term (DK_IN_WALK)."""
    i_s, row0, o_c, m_t, n_t, o_d, m_d, o_s, m_s, _, _ = mini_batch_program(
        w, b, cu_seqlens, chunk_indices, T, H, D, BD, BC, IS_VARLEN)
    b_W = tl.load(hs + i_s * D * D + o_s, mask=m_s, other=0.).to(tl.float32)
    b_dz = load_rows(dgu + row0 * D, o_c, m_t, o_d, D, H)
    b_dk = (load_rows(dka + row0 * D, o_c, m_t, o_d, D, H)
            + tl.dot(b_dz, tl.trans(b_W), input_precision=PRECISION))
    last = o_c == n_t - 1
    if not DK_IN_WALK:
        b_e = tl.load(eta + row0 + o_c * H, mask=m_t, other=0.).to(tl.float32)
        b_dW = tl.load(dhs + i_s * D * D + o_s, mask=m_s, other=0.).to(tl.float32)
        b_g = load_rows(du + row0 * D, o_c, m_t, o_d, D, H)
        b_dk -= tl.sum(tl.where(last, b_e, 0.), 0) * tl.dot(b_g, tl.trans(b_dW),
                                                            input_precision=PRECISION)
    store_rows(dk + row0 * D, b_dk, o_c, m_t, o_d, D, H)
    b_de = tl.load(deu + row0 + o_c * H, mask=m_t, other=0.)
    b_de += tl.where(last, tl.load(delast + i_s), 0.)
    tl.store(deta + row0 + o_c * H, b_de.to(deta.dtype.element_ty), mask=m_t)


def chunk_backward(q, k, v, w, b, eta, hs, hbs, h0, do, dht, dhbt, scale, eps, chunk_size,
                   cu_seqlens):
    """(dq, dk, dv, dw, db, deta, d initial W or None, d initial hb or None), from the states
    each mini-batch started with (hs, hbs); fused_chunk's run_backward's contract."""
    B, T, H, D = q.shape
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, chunk_size)
    chunks = NT * (B if cu_seqlens is None else 1)
    dht, dhbt = final_state_grads(q, dht, dhbt, N)
    f32 = {"dtype": torch.float32, "device": q.device}
    dq, dk, dv, deta = (torch.empty_like(x) for x in (q, k, v, eta))
    z, du, dgu, dka = (torch.empty(B, T, H, D, **f32) for _ in range(4))
    deu = torch.empty(B, T, H, **f32)
    dhs = None if DK_IN_WALK else torch.empty(chunks, H, D, D, dtype=states_dtype(q),
                                              device=q.device)
    delast = torch.empty(chunks, H, **f32)
    dw1, db1 = torch.empty(chunks, H, D, **f32), torch.empty(chunks, H, D, **f32)
    dw2, db2 = torch.empty(N, H, D, **f32), torch.empty(N, H, D, **f32)
    dh0 = None if h0 is None else torch.empty(N, H, D, D, **f32)
    dhb0 = None if h0 is None else torch.empty(N, H, 1, D, **f32)
    meta = launch_meta(q, chunk_size)
    mixed = walk_mixed()
    do = do.contiguous().to(v.dtype)
    if NT:
        chunk_ttt_linear_bwd_local_kernel[(NT, B * H)](
            q, k, v, w, b, eta, do, hs, hbs, dq, z, du, dgu, dka, deu, dw1, db1, cu_seqlens,
            chunk_indices, scale, float(eps), T, MIXED=mixed, **meta)
    chunk_ttt_linear_bwd_walk_kernel[(N * H,)](
        q, k, v, w, b, eta, z, du, dgu, dka, dv, dhs, delast, dht, dhbt, dh0, dhb0, dw2, db2,
        cu_seqlens, chunk_offsets, scale, float(eps), T, DK_IN_WALK=DK_IN_WALK,
        PREFETCH=PREFETCH, num_stages=WALK_STAGES, **walk_meta(q, chunk_size))
    if NT:
        chunk_ttt_linear_bwd_dk_kernel[(NT, B * H)](
            w, b, eta, hs, dhs, du, dgu, dka, deu, delast, dk, deta, cu_seqlens, chunk_indices,
            T, DK_IN_WALK=DK_IN_WALK, **meta)
    dw = dw1.sum(0) + dw2.sum(0)
    db = db1.sum(0) + db2.sum(0)
    return dq, dk, dv, dw.to(w.dtype), db.to(b.dtype), deta, dh0, dhb0
