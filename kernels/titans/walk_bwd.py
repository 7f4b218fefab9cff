"""chunk_titans_linear's backward walk (step 2 of kernels/titans/chunk_bwd.py's module docstring,
which has the math and the switches): dM', dS' carried from the last mini-batch to the first, in
one of two forms.

- ``chunk_titans_linear_bwd_walk_kernel``: one program per (sequence, head) holds dM', dS'
  [D, D] whole.
- ``chunk_titans_linear_bwd_walk_cols_kernel``: under PAIRED two programs per (sequence,
  head), each holding columns o_v of dM', dS' [D, BV] (BV = BD / 2). Every step of the walk
  but one is column by column: K dM', dG, the backward of G = 2 ln_recon_grad(Z, V - K) given
  its rows' sums, and the hand-back (dM'[:, o_v] takes dU, dZ of columns o_v and Q~, K
  whole). The one is the LayerNorm backward's sums over a row: each program sums its columns
  of the five that depend on dG (layernorm.ln_recon_grad_bwd_sums) and of dcM, dcS, and the
  pair swap those seven [C] partial sums once a mini-batch through global memory
  (minibatch.step_signal, step_wait). The rows' sums of the forward's (the LayerNorm's
  moments) come from the backward's first kernel (stages.store_moments). Without PAIRED it is
  one program per (sequence, head) (BV = BD) going through the same sums, the form Triton's
  interpreter runs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.layernorm import (ln_recon_grad_bwd_cols, ln_recon_grad_bwd_rows,
                                      ln_recon_grad_bwd_sums, ln_recon_grad_cols, row_sums)
from kernels.common.minibatch import (dot_state, dot_state_into, head_tiles, step_signal,
                                      step_wait, start_slice, start_square, store_square_scaled,
                                      walk_program)
from kernels.common.utils import load_rows, store_rows, walk_bounds
from kernels.titans.stages import (ROW_CM, ROW_CS, ROW_DCM, ROW_DCS, ROW_E0, ROW_F0, ROW_P0,
                                   gr_col, moments, store_gr_col)

__all__ = ["chunk_titans_linear_bwd_walk_cols_kernel", "chunk_titans_linear_bwd_walk_kernel"]


@triton.jit
def walk_rows(q, k, v, z, du, dgu, dka, gr, i_t, bos, L, i_h, o_c, o_d, D: tl.constexpr,
              H: tl.constexpr, BC: tl.constexpr):
    """Mini-batch i_t's rows as the walk takes them, float32, zeros past the sequence and for
    i_t < 0: (Q unscaled, K, V, Z, dU, dG_U, dK_W, cM, cS, f0, p0, e0)."""
    row0 = (bos + i_t * BC) * H + i_h
    m_t = (i_t * BC + o_c < L) & (i_t >= 0)
    return (load_rows(q + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            load_rows(k + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            load_rows(v + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            load_rows(z + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(du + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(dgu + row0 * D, o_c, m_t, o_d, D, H),
            load_rows(dka + row0 * D, o_c, m_t, o_d, D, H),
            gr_col(gr, row0, o_c, m_t, H, ROW_CM), gr_col(gr, row0, o_c, m_t, H, ROW_CS),
            gr_col(gr, row0, o_c, m_t, H, ROW_F0), gr_col(gr, row0, o_c, m_t, H, ROW_P0),
            gr_col(gr, row0, o_c, m_t, H, ROW_E0))


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['dh0'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'SCALED': lambda a: a['dmr'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_bwd_walk_kernel(
    q, k, v, w, b, z, du, dgu, dka, dv, gr, dms, dss, dmr, dsr, dht, dst, dh0, ds0, dw, db,
    cu_seqlens, chunk_offsets, scale, eps, T, H: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    UMIXED: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, PREFETCH: tl.constexpr, ACCUMULATE: tl.constexpr,
    SCALED: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence and head: dM', dS' carried from the last mini-batch to the first (step 2 of
    the module docstring), stored per mini-batch (SCALED: in float16, rows scaled, their
    inverse scales in dmr, dsr); dw, db of G's LayerNorm per (sequence, head)."""
    i_nh, i_h, bos, L, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b = walk_program(
        w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC, IS_VARLEN)
    o_c = tl.arange(0, BC)
    b_dM = start_square(dht, i_nh, o_s, m_s, D, BD, USE_FINAL_STATE_GRADIENT)
    b_dS = start_square(dst, i_nh, o_s, m_s, D, BD, USE_FINAL_STATE_GRADIENT)
    b_dwa = tl.zeros([BD], dtype=tl.float32)
    b_dba = tl.zeros([BD], dtype=tl.float32)
    if PREFETCH:
        (b_qr, b_k, b_v, b_z, b_du, b_dgu, b_dka, b_cm, b_cs, b_f0, b_p0, b_e0) = walk_rows(
            q, k, v, z, du, dgu, dka, gr, NT - 1, bos, L, i_h, o_c, o_d, D, H, BC)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        i_s = ((c0 + i_t) * H + i_h).to(tl.int64)
        if SCALED:
            store_square_scaled(dms, dmr, i_s, b_dM, o_d, m_d, o_s, m_s, D)
            store_square_scaled(dss, dsr, i_s, b_dS, o_d, m_d, o_s, m_s, D)
        else:
            tl.store(dms + i_s * D * D + o_s, b_dM, mask=m_s)
            tl.store(dss + i_s * D * D + o_s, b_dS, mask=m_s)
        row0 = (bos + i_t * BC) * H + i_h
        m_t = i_t * BC + o_c < L
        if PREFETCH:  # mini-batch i_t - 1's
            (n_qr, n_k, n_v, n_z, n_du, n_dgu, n_dka, n_cm, n_cs, n_f0, n_p0, n_e0) = walk_rows(
                q, k, v, z, du, dgu, dka, gr, i_t - 1, bos, L, i_h, o_c, o_d, D, H, BC)
        else:
            (b_qr, b_k, b_v, b_z, b_du, b_dgu, b_dka, b_cm, b_cs, b_f0, b_p0, b_e0) = walk_rows(
                q, k, v, z, du, dgu, dka, gr, i_t, bos, L, i_h, o_c, o_d, D, H, BC)
        last = o_c == tl.minimum(BC, L - i_t * BC) - 1
        # M' = f0[n] M0 + p0[n] S0 - K^T (cM o G),  S' = e0[n] S0 - K^T (cS o G)
        b_rm = dot_state(b_k, b_dM, k.dtype.element_ty, PRECISION, MIXED)
        b_rs = dot_state(b_k, b_dS, k.dtype.element_ty, PRECISION, MIXED)
        b_dg = b_dgu - b_cm[:, None] * b_rm - b_cs[:, None] * b_rs
        # G = 2 ln_recon_grad(Z, V - K)
        b_dz, b_dt, b_dw, b_db, b_g = ln_recon_grad_bwd_rows(
            tl.where(m_t[:, None], 2. * b_dg, 0.), b_z, b_v - b_k, b_w, b_b, m_d, D, eps)
        b_g = tl.where(m_t[:, None], 2. * b_g, 0.)
        store_gr_col(gr, row0, o_c, m_t, H, ROW_DCM, -tl.sum(b_g * b_rm, 1))
        store_gr_col(gr, row0, o_c, m_t, H, ROW_DCS, -tl.sum(b_g * b_rs, 1))
        # Z = K M0,  U = f0 (Q~ M0) + p0 (Q~ S0) - ...
        b_dM, b_dS = hand_back(b_dM, b_dS, b_qr, b_k, b_du, b_dz, b_f0, b_p0, b_e0, last, scale,
                               k.dtype.element_ty, PRECISION, UMIXED, ACCUMULATE)
        b_dwa += b_dw
        b_dba += b_db
        store_walk_rows(du, dgu, dka, dv, row0, b_g, b_dz, b_dka, b_dt, o_c, m_t, o_d, D, H)
        if PREFETCH:
            (b_qr, b_k, b_v, b_z, b_du, b_dgu, b_dka, b_cm, b_cs, b_f0, b_p0, b_e0) = (
                n_qr, n_k, n_v, n_z, n_du, n_dgu, n_dka, n_cm, n_cs, n_f0, n_p0, n_e0)
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * D * D + o_s, b_dM, mask=m_s)
        tl.store(ds0 + i_nh.to(tl.int64) * D * D + o_s, b_dS, mask=m_s)
    tl.store(dw + i_nh * D + o_d, b_dwa, mask=m_d)
    tl.store(db + i_nh * D + o_d, b_dba, mask=m_d)


@triton.jit
def hand_back(b_dM, b_dS, b_qr, b_k, b_du, b_dz, b_f0, b_p0, b_e0, last, scale,
              HALF: tl.constexpr, PRECISION: tl.constexpr, UMIXED: tl.constexpr,
              ACCUMULATE: tl.constexpr):
    """(dM', dS') of the mini-batch before: f0[n] dM' + Q~^T (f0 o dU) + K^T dZ,
    p0[n] dM' + e0[n] dS' + Q~^T (p0 o dU) (Q~ = scale Q, b_qr Q's rows; n the row ``last``);
    under ACCUMULATE (WALK_ACCUMULATE) each product accumulated into the rest of its sum."""
    f0n = tl.sum(tl.where(last, b_f0, 0.), 0)
    p0n = tl.sum(tl.where(last, b_p0, 0.), 0)
    e0n = tl.sum(tl.where(last, b_e0, 0.), 0)
    b_qt = tl.trans(b_qr)
    if ACCUMULATE:
        b_dM, b_dS = (
            dot_state_into(tl.trans(b_k), b_dz, dot_state_into(
                b_qt, (scale * b_f0)[:, None] * b_du, f0n * b_dM, HALF, PRECISION, UMIXED),
                HALF, PRECISION, UMIXED),
            dot_state_into(b_qt, (scale * b_p0)[:, None] * b_du, p0n * b_dM + e0n * b_dS, HALF,
                           PRECISION, UMIXED))
    else:
        b_dM, b_dS = (f0n * b_dM
                      + scale * dot_state(b_qt, b_f0[:, None] * b_du, HALF, PRECISION, UMIXED)
                      + dot_state(tl.trans(b_k), b_dz, HALF, PRECISION, UMIXED),
                      p0n * b_dM + e0n * b_dS
                      + scale * dot_state(b_qt, b_p0[:, None] * b_du, HALF, PRECISION, UMIXED))
    return b_dM, b_dS


@triton.jit
def store_walk_rows(du, dgu, dka, dv, row0, b_g, b_dz, b_dka, b_dt, o_c, m_t, o_v,
                    D: tl.constexpr, H: tl.constexpr):
    """A mini-batch's walk results on columns o_v: G over dU, dZ over dG_U, dK_W - dV over
    dK_W, and dV."""
    store_rows(du + row0 * D, b_g, o_c, m_t, o_v, D, H)
    store_rows(dgu + row0 * D, b_dz, o_c, m_t, o_v, D, H)
    store_rows(dka + row0 * D, b_dka - b_dt, o_c, m_t, o_v, D, H)
    store_rows(dv + row0 * D, b_dt, o_c, m_t, o_v, D, H)


@triton.jit
def cols_rows(q, k, v, z, du, dgu, dka, gr, i_t, bos, L, i_h, o_c, o_d, o_v, D: tl.constexpr,
              H: tl.constexpr, BC: tl.constexpr):
    """Mini-batch i_t's rows as the walk by columns takes them, float32, zeros past the
    sequence and for i_t < 0: (Q unscaled, K) whole, (Z, V - K, dU, dG_U, dK_W) of columns
    o_v, (cM, cS, f0, p0, e0), and G's LayerNorm moments (stages.moments)."""
    row0 = (bos + i_t * BC) * H + i_h
    m_t = (i_t * BC + o_c < L) & (i_t >= 0)
    return (load_rows(q + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            load_rows(k + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32),
            load_rows(z + row0 * D, o_c, m_t, o_v, D, H),
            load_rows(v + row0 * D, o_c, m_t, o_v, D, H).to(tl.float32)
            - load_rows(k + row0 * D, o_c, m_t, o_v, D, H).to(tl.float32),
            load_rows(du + row0 * D, o_c, m_t, o_v, D, H),
            load_rows(dgu + row0 * D, o_c, m_t, o_v, D, H),
            load_rows(dka + row0 * D, o_c, m_t, o_v, D, H),
            gr_col(gr, row0, o_c, m_t, H, ROW_CM), gr_col(gr, row0, o_c, m_t, H, ROW_CS),
            gr_col(gr, row0, o_c, m_t, H, ROW_F0), gr_col(gr, row0, o_c, m_t, H, ROW_P0),
            gr_col(gr, row0, o_c, m_t, H, ROW_E0), moments(gr, row0, o_c, m_t, H))


@triton.jit
def swap_sums(xs, flags, i_nh, i_k, step, o_c, BC: tl.constexpr, b_a1, b_a2, b_a3, b_a4, b_a5,
              b_cm, b_cs):
    """The seven [C] sums of a pair's two programs (i_k 0 and 1), each program's added to the
    other's: stored to xs (two steps' places a program, as a program may store step + 1's
    before the other has read step's), flagged, and the other's read back once it flags."""
    base = (i_nh * 2 + step % 2) * 2
    p_x = xs + (base + i_k).to(tl.int64) * 7 * BC + o_c
    p_y = xs + (base + 1 - i_k).to(tl.int64) * 7 * BC + o_c
    tl.store(p_x, b_a1)
    tl.store(p_x + BC, b_a2)
    tl.store(p_x + 2 * BC, b_a3)
    tl.store(p_x + 3 * BC, b_a4)
    tl.store(p_x + 4 * BC, b_a5)
    tl.store(p_x + 5 * BC, b_cm)
    tl.store(p_x + 6 * BC, b_cs)
    step_signal(flags + i_nh * 2 + i_k, step)
    step_wait(flags + i_nh * 2 + 1 - i_k, step)
    return (b_a1 + tl.load(p_y, cache_modifier=".cg"),
            b_a2 + tl.load(p_y + BC, cache_modifier=".cg"),
            b_a3 + tl.load(p_y + 2 * BC, cache_modifier=".cg"),
            b_a4 + tl.load(p_y + 3 * BC, cache_modifier=".cg"),
            b_a5 + tl.load(p_y + 4 * BC, cache_modifier=".cg"),
            b_cm + tl.load(p_y + 5 * BC, cache_modifier=".cg"),
            b_cs + tl.load(p_y + 6 * BC, cache_modifier=".cg"))


@triton.jit
def cols_grads(b_dgu, b_cm, b_cs, b_rm, b_rs, b_zv, b_tv, b_mo, b_wv, b_bv, w0, m_v, m_t, gr,
               row0, xs, flags, i_nh, i_k, step, o_c, H: tl.constexpr, D: tl.constexpr,
               BC: tl.constexpr, PAIRED: tl.constexpr):
    """A mini-batch's dG = dG_U - cM o (K dM') - cS o (K dS') on the program's columns (b_rm,
    b_rs: K dM', K dS' there) and the backward of G = 2 ln_recon_grad(Z, V - K): (dZ, dV, dw,
    db, G) on its columns (w0 = sum w^2; b_mo the rows' moments, stages.moments), the rows'
    sums over both programs' columns under PAIRED (swap_sums); dcM, dcS stored to ``gr`` by
    the first program."""
    b_dg = tl.where(m_t[:, None], 2. * (b_dgu - b_cm[:, None] * b_rm - b_cs[:, None] * b_rs),
                    0.)
    b_mean, b_sigma, b_s1, b_s2, b_w1, b_w2 = b_mo
    b_x, b_r, b_g = ln_recon_grad_cols(b_zv, b_tv, b_wv, b_bv, m_v, b_mean, b_sigma, b_s1, b_s2,
                                       D)
    b_a1, b_a2, b_a3, b_a4, b_a5 = ln_recon_grad_bwd_sums(b_dg, b_x, b_g, b_wv)
    b_g = tl.where(m_t[:, None], 2. * b_g, 0.)
    b_sm, b_ss = row_sums(b_g * b_rm, b_g * b_rs)
    if PAIRED:
        b_a1, b_a2, b_a3, b_a4, b_a5, b_sm, b_ss = swap_sums(
            xs, flags, i_nh, i_k, step, o_c, BC, b_a1, b_a2, b_a3, b_a4, b_a5, b_sm, b_ss)
    store_gr_col(gr, row0, o_c, m_t & (i_k == 0), H, ROW_DCM, -b_sm)
    store_gr_col(gr, row0, o_c, m_t & (i_k == 0), H, ROW_DCS, -b_ss)
    b_dz, b_dt, b_dw, b_db = ln_recon_grad_bwd_cols(
        b_dg, b_x, b_r, b_wv, m_v, b_sigma, b_s1, b_s2, b_w1, b_w2, w0, b_a1, b_a2, b_a3,
        b_a4, b_a5, D)
    return b_dz, b_dt, b_dw, b_db, b_g


@triton.jit
def cols_program(w, b, ticket, cu_seqlens, chunk_offsets, T, H: tl.constexpr, D: tl.constexpr,
                 BD: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, PAIRED: tl.constexpr,
                 IS_VARLEN: tl.constexpr):
    """What a program of the walk by columns walks: (i_nh, i_k, i_h, bos, L, NT, c0) (its
    (sequence, head), its slice, its tokens and mini-batches), its head's columns o_d, m_d and
    w, its slice's o_v, m_v, w, b, and the offsets and mask of its [BD, BV] slice of a state.
    Under PAIRED program ids come from the counter ``ticket`` (minibatch.step_wait)."""
    if PAIRED:
        i_p = tl.atomic_add(ticket, 1)
        i_nh, i_k = i_p // 2, i_p % 2
    else:
        i_nh, i_k = tl.program_id(0), 0
    i_h = i_nh % H
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_nh // H, T, BC, IS_VARLEN)
    o_d, m_d, _, _, b_w, _ = head_tiles(w, b, i_h, D, BD)
    o_v = i_k * BV + tl.arange(0, BV)
    m_v = o_v < D
    b_wv = tl.load(w + i_h * D + o_v, mask=m_v, other=0.).to(tl.float32)
    b_bv = tl.load(b + i_h * D + o_v, mask=m_v, other=0.).to(tl.float32)
    return (i_nh, i_k, i_h, bos, eos - bos, NT, c0, o_d, m_d, b_w, o_v, m_v, b_wv, b_bv,
            o_d[:, None] * D + o_v[None, :], m_d[:, None] & m_v[None, :])


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['dh0'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_bwd_walk_cols_kernel(
    q, k, v, w, b, z, du, dgu, dka, dv, gr, dms, dss, dht, dst, dh0, ds0, dw, db, ticket, flags,
    xs, cu_seqlens, chunk_offsets, scale, T, H: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, PAIRED: tl.constexpr,
    PRECISION: tl.constexpr, MIXED: tl.constexpr, UMIXED: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    PREFETCH: tl.constexpr, ACCUMULATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Columns o_v of one sequence and head's dM', dS' carried from the last mini-batch to the
    first (the module docstring), stored per mini-batch in float32; dw, db of G's LayerNorm
    per (sequence, head) on columns o_v."""
    (i_nh, i_k, i_h, bos, L, NT, c0, o_d, m_d, b_w, o_v, m_v, b_wv, b_bv, o_s,
     m_s) = cols_program(w, b, ticket, cu_seqlens, chunk_offsets, T, H, D, BD, BV, BC, PAIRED,
                         IS_VARLEN)
    o_c = tl.arange(0, BC)
    w0 = tl.sum(b_w * b_w, 0)
    b_dM = start_slice(dht, i_nh, o_s, m_s, D, BD, BV, USE_FINAL_STATE_GRADIENT)
    b_dS = start_slice(dst, i_nh, o_s, m_s, D, BD, BV, USE_FINAL_STATE_GRADIENT)
    b_dwa = tl.zeros([BV], dtype=tl.float32)
    b_dba = tl.zeros([BV], dtype=tl.float32)
    if PREFETCH:
        (b_qr, b_k, b_zv, b_tv, b_du, b_dgu, b_dka, b_cm, b_cs, b_f0, b_p0, b_e0,
         b_mo) = cols_rows(q, k, v, z, du, dgu, dka, gr, NT - 1, bos, L, i_h, o_c, o_d, o_v, D,
                           H, BC)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        i_s = ((c0 + i_t) * H + i_h).to(tl.int64)
        tl.store(dms + i_s * D * D + o_s, b_dM, mask=m_s)
        tl.store(dss + i_s * D * D + o_s, b_dS, mask=m_s)
        row0 = (bos + i_t * BC) * H + i_h
        m_t = i_t * BC + o_c < L
        if PREFETCH:  # mini-batch i_t - 1's
            (n_qr, n_k, n_zv, n_tv, n_du, n_dgu, n_dka, n_cm, n_cs, n_f0, n_p0, n_e0,
             n_mo) = cols_rows(q, k, v, z, du, dgu, dka, gr, i_t - 1, bos, L, i_h, o_c, o_d, o_v,
                               D, H, BC)
        else:
            (b_qr, b_k, b_zv, b_tv, b_du, b_dgu, b_dka, b_cm, b_cs, b_f0, b_p0, b_e0,
             b_mo) = cols_rows(q, k, v, z, du, dgu, dka, gr, i_t, bos, L, i_h, o_c, o_d, o_v, D,
                               H, BC)
        last = o_c == tl.minimum(BC, L - i_t * BC) - 1
        b_rm = dot_state(b_k, b_dM, k.dtype.element_ty, PRECISION, MIXED)
        b_rs = dot_state(b_k, b_dS, k.dtype.element_ty, PRECISION, MIXED)
        b_dz, b_dt, b_dw, b_db, b_g = cols_grads(
            b_dgu, b_cm, b_cs, b_rm, b_rs, b_zv, b_tv, b_mo, b_wv, b_bv, w0, m_v, m_t, gr, row0,
            xs, flags, i_nh, i_k, i_r, o_c, H, D, BC, PAIRED)
        b_dM, b_dS = hand_back(b_dM, b_dS, b_qr, b_k, b_du, b_dz, b_f0, b_p0, b_e0, last, scale,
                               k.dtype.element_ty, PRECISION, UMIXED, ACCUMULATE)
        b_dwa += b_dw
        b_dba += b_db
        store_walk_rows(du, dgu, dka, dv, row0, b_g, b_dz, b_dka, b_dt, o_c, m_t, o_v, D, H)
        if PREFETCH:
            (b_qr, b_k, b_zv, b_tv, b_du, b_dgu, b_dka, b_cm, b_cs, b_f0, b_p0, b_e0,
             b_mo) = (n_qr, n_k, n_zv, n_tv, n_du, n_dgu, n_dka, n_cm, n_cs, n_f0, n_p0, n_e0,
                      n_mo)
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * D * D + o_s, b_dM, mask=m_s)
        tl.store(ds0 + i_nh.to(tl.int64) * D * D + o_s, b_dS, mask=m_s)
    tl.store(dw + i_nh * D + o_v, b_dwa, mask=m_v)
    tl.store(db + i_nh * D + o_v, b_dba, mask=m_v)
