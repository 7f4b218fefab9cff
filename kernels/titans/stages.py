"""Titans' kernel stages shared by the forward (kernels/titans/walk.py, outputs.py) and the backward
(kernels/titans/chunk_bwd.py): a mini-batch's rows, its reconstruction gradients, and the
segment products of its gate factors with their backward and the row the states are handed on
by.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.layernorm import (layer_norm_bwd_rows, layer_norm_rows,
                                      ln_recon_grad_moments, ln_recon_grad_rows)
from kernels.common.minibatch import dot_state, dot_state_into, load_square, load_square_scaled
from kernels.common.utils import dot_mixed, load_rows

__all__ = ["NG", "ROW_CM", "ROW_CS", "ROW_DCM", "ROW_DCS", "ROW_DF0", "ROW_DP0", "ROW_DTH",
           "ROW_E0", "ROW_F0", "ROW_MOMENTS", "ROW_P0", "ahead_gates", "dot_at", "dot_q",
           "dq_state", "gate_rows", "gates_bwd", "gr_col", "grads_from_z", "hand_on",
           "hand_on_gates", "hand_on_scaled", "handed_scales", "load_states", "local_meta",
           "mini_batch_rows", "moments", "outputs_bwd", "recon_grads", "row_of",
           "segment_products", "segment_products_bwd", "store_gr_col", "store_moments",
           "stored_grads", "update_gates"]


def local_meta(meta: dict) -> dict:
    """chunk.walk_meta's constexprs for a kernel other than the walks (UMIXED taken out)."""
    return {key: x for key, x in meta.items() if key != "UMIXED"}


# The columns of the per-row float32 tensor ``gr`` [B, T, H, NG] the backward's three kernels
# hand on (kernels/titans/chunk_bwd.py); ROW_MOMENTS on, the six of store_moments.
(ROW_CM, ROW_CS, ROW_F0, ROW_P0, ROW_E0, ROW_DP0, ROW_DF0, ROW_DTH, ROW_DCM,
 ROW_DCS, ROW_MOMENTS) = (tl.constexpr(j) for j in range(11))
NG = tl.constexpr(16)


@triton.jit
def gr_col(gr, row0, o_c, m_t, H: tl.constexpr, j: tl.constexpr):
    """Column j of ``gr`` over the mini-batch's rows (0 past the sequence)."""
    return tl.load(gr + (row0 + o_c * H) * NG + j, mask=m_t, other=0.)


@triton.jit
def store_gr_col(gr, row0, o_c, m_t, H: tl.constexpr, j: tl.constexpr, b_x):
    tl.store(gr + (row0 + o_c * H) * NG + j, b_x, mask=m_t)


@triton.jit
def store_moments(gr, row0, o_c, m_t, H: tl.constexpr, b_z, b_t, b_w, b_b, m_d, D: tl.constexpr,
                  eps):
    """The moments of G = 2 ln_recon_grad(Z, V - K) (b_t: V - K) that a walk by column slices
    takes from whole rows (layernorm.ln_recon_grad_moments) into gr's columns
    ROW_MOMENTS + 0..5."""
    b_mean, b_sigma, b_s1, b_s2, b_w1, b_w2 = ln_recon_grad_moments(b_z, b_t, b_w, b_b, m_d, D,
                                                                    eps)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS, b_mean)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 1, b_sigma)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 2, b_s1)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 3, b_s2)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 4, b_w1)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 5, b_w2)


@triton.jit
def moments(gr, row0, o_c, m_t, H: tl.constexpr):
    """store_moments' six [C] columns: (mean(Z), sigma, s1, s2, W1, W2); sigma 1 past the
    sequence (where the rows are 0)."""
    return (gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS),
            tl.load(gr + (row0 + o_c * H) * NG + ROW_MOMENTS + 1, mask=m_t, other=1.),
            gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 2),
            gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 3),
            gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 4),
            gr_col(gr, row0, o_c, m_t, H, ROW_MOMENTS + 5))


@triton.jit
def _segment(b_lo, b_zo, b_l, b_z, live):
    """exp(b_lo[i] - b_l[j]) where live and no zero factor lies between (b_zo[i] == b_z[j])."""
    live = live & (b_zo[:, None] == b_z[None, :])
    return tl.where(live, tl.exp(tl.where(live, b_lo[:, None] - b_l[None, :], 0.)).to(tl.float32),
                    0.)


@triton.jit
def segment_products(b_f, o_c):
    """(F, f0, Fx, f0x) of factors b_f [C] in [0, 1]: F[i, j] = prod_{j < r <= i} f_r (0 for
    j > i), f0[i] = prod_{r <= i} f_r, and the same ending one factor earlier, for the
    backward: Fx[i, j] = F[i - 1, j] (0 for j >= i), f0x[i] = f0[i - 1] (1 at i = 0). Zero
    factors counted apart (a segment over one is an exact 0); logs taken, summed and raised in
    float64: a float32 log or exponent of a product near e^-60 (eta = e^-60, say) is off by up
    to 60 float32 ulps of 1, so the product by as much relatively: float32 d initial momentum
    at T = 1 with eta in [e^-60, e^-5] had 2.0e-6 of error, 111% of its tolerance, and 7.4e-8
    (5%) with float64 (H100)."""
    b_lr = tl.log(tl.where(b_f > 0, b_f, 1.).to(tl.float64))
    b_zr = (b_f == 0).to(tl.int32)
    b_l = tl.cumsum(b_lr, 0)
    b_z = tl.cumsum(b_zr, 0)
    b_lx, b_zx = b_l - b_lr, b_z - b_zr
    b_F = _segment(b_l, b_z, b_l, b_z, o_c[:, None] >= o_c[None, :])
    b_Fx = _segment(b_lx, b_zx, b_l, b_z, o_c[:, None] > o_c[None, :])
    return (b_F, tl.where(b_z == 0, tl.exp(b_l).to(tl.float32), 0.), b_Fx,
            tl.where(b_zx == 0, tl.exp(b_lx).to(tl.float32), 0.))


@triton.jit
def segment_products_bwd(b_dF, b_df0, b_F, b_Fx, b_f0x, PRECISION: tl.constexpr):
    """d f [C] of (F, f0) = segment_products(f), given dF [C, C] (0 above the diagonal) and
    df0 [C]. A product without its factor r splits at r: prod_{j < s <= i, s != r} f_s =
    F[i, r] Fx[r, j] and prod_{s <= i, s != r} f_s = F[i, r] f0x[r], so that no factor is
    divided by (a zero factor's derivative is the product of the others):

        df_r = sum_{i >= r} F[i, r] ((dF Fx^T)[i, r] + df0_i f0x_r)."""
    b_Y = tl.dot(b_dF, tl.trans(b_Fx), input_precision=PRECISION)
    return tl.sum(b_F * (b_Y + b_df0[:, None] * b_f0x[None, :]), 0)


@triton.jit
def row_of(b_x, last):
    """Row n (``last`` marks it) of a [C, C] matrix, as a [C] vector."""
    return tl.sum(tl.where(last[:, None], b_x, 0.), 0)


@triton.jit
def hand_on_gates(b_F, b_f0, b_E, b_e0, last):
    """What the states handed on take from the gates, at row n (``last`` marks it): (P[n] [C],
    E[n] [C], f0[n], e0[n], p0[n]), P = F E, p0 = F e0."""
    b_fn = row_of(b_F, last)
    b_en = row_of(b_E, last)
    return (tl.sum(b_fn[:, None] * b_E, 0), b_en, tl.sum(tl.where(last, b_f0, 0.), 0),
            tl.sum(tl.where(last, b_e0, 0.), 0), tl.sum(b_fn * b_e0, 0))


@triton.jit
def hand_on(b_M, b_S, b_k, b_g, b_cm, b_cs, f0n, e0n, p0n, HALF: tl.constexpr,
            PRECISION: tl.constexpr, UMIXED: tl.constexpr, ACCUMULATE: tl.constexpr):
    """(M, S) handed on: f0[n] M0 + p0[n] S0 - K^T (cM o G), e0[n] S0 - K^T (cS o G); under
    ACCUMULATE (chunk.WALK_ACCUMULATE) each product accumulated into the rest of its sum."""
    b_kt = tl.trans(b_k)
    if ACCUMULATE:
        b_M, b_S = (dot_state_into(b_kt, -b_cm[:, None] * b_g, f0n * b_M + p0n * b_S, HALF,
                                   PRECISION, UMIXED),
                    dot_state_into(b_kt, -b_cs[:, None] * b_g, e0n * b_S, HALF, PRECISION,
                                   UMIXED))
    else:
        b_dM = dot_state(b_kt, b_cm[:, None] * b_g, HALF, PRECISION, UMIXED)
        b_dS = dot_state(b_kt, b_cs[:, None] * b_g, HALF, PRECISION, UMIXED)
        b_M, b_S = f0n * b_M + p0n * b_S - b_dM, e0n * b_S - b_dS
    return b_M, b_S


# hand_on_scaled: a scale under this is put into its tile (f0[n] or e0[n] 0, or a long run of
# small factors), so that a tile stays within 2^40 of the state it stands for
SCALE_FLOOR = tl.constexpr(2.0 ** -40)


@triton.jit
def handed_scales(b_M, b_S, m, s, f0n, e0n, p0n):
    """The gates' part of hand_on_scaled: (N^ = M^ + (p0[n] s / m') S^, S^, m', s') with
    m' = f0[n] m, s' = e0[n] s, a new scale under SCALE_FLOOR put into its tile first (the tile
    times it, the scale 1: a zero factor gives a zero tile, as hand_on's product does)."""
    mf = m * f0n
    if mf < SCALE_FLOOR:
        b_M = b_M * mf
        mf = 1.
    b_N = b_M + (p0n * s / mf) * b_S
    se = s * e0n
    if se < SCALE_FLOOR:
        b_S = b_S * se
        se = 1.
    return b_N, b_S, mf, se


@triton.jit
def hand_on_scaled(b_M, b_S, m, s, b_k, b_g, b_cm, b_cs, f0n, e0n, p0n, HALF: tl.constexpr,
                   PRECISION: tl.constexpr, UMIXED: tl.constexpr):
    """hand_on for states kept as a scale times a tile, M = m M^, S = s S^ (chunk.WALK_SCALES):
    (M^, S^, m, s) handed on, the scales taking f0[n] and e0[n], so that the tiles take only
    p0[n] S0 element by element: M^ <- M^ + (p0[n] s / m') S^ - K^T ((cM / m') o G) with
    m' = f0[n] m, S^ <- S^ - K^T ((cS / s') o G) with s' = e0[n] s (handed_scales), each update
    accumulated into the rest of its sum."""
    b_kt = tl.trans(b_k)
    b_N, b_S, mf, se = handed_scales(b_M, b_S, m, s, f0n, e0n, p0n)
    b_M = dot_state_into(b_kt, (-b_cm / mf)[:, None] * b_g, b_N, HALF, PRECISION, UMIXED)
    b_S = dot_state_into(b_kt, (-b_cs / se)[:, None] * b_g, b_S, HALF, PRECISION, UMIXED)
    return b_M, b_S, mf, se


@triton.jit
def update_gates(b_th, b_a, b_e, o_c, last):
    """What the states' updates take from a mini-batch's gates (theta, 1 - alpha, eta [C];
    ``last`` marks row n): (cM = P[n] theta, cS = E[n] theta [C], f0[n], e0[n], p0[n])."""
    b_F, b_f0, _, _ = segment_products(b_a, o_c)
    b_E, b_e0, _, _ = segment_products(b_e, o_c)
    b_pn, b_en, f0n, e0n, p0n = hand_on_gates(b_F, b_f0, b_E, b_e0, last)
    return b_pn * b_th, b_en * b_th, f0n, e0n, p0n


@triton.jit
def ahead_gates(gc, gn, i_s, i_t, bos, L, i_h, o_c, H: tl.constexpr, BC: tl.constexpr):
    """Mini-batch i_t's update_gates as chunk.py's gates kernel stored them (i_s: its index
    among all mini-batches times H plus its head)."""
    m_t = i_t * BC + o_c < L
    p = ((bos + i_t * BC) * H + i_h + o_c * H) * 2
    return (tl.load(gc + p, mask=m_t, other=0.), tl.load(gc + p + 1, mask=m_t, other=0.),
            tl.load(gn + i_s * 4), tl.load(gn + i_s * 4 + 1), tl.load(gn + i_s * 4 + 2))


@triton.jit
def gate_rows(theta, alpha, eta, row0, o_c, m_t, H: tl.constexpr):
    """The mini-batch's theta (0 past the sequence), 1 - alpha and eta (1 past it), float32."""
    p = row0 + o_c * H
    b_th = tl.load(theta + p, mask=m_t, other=0.).to(tl.float32)
    b_a = 1. - tl.load(alpha + p, mask=m_t, other=0.).to(tl.float32)
    b_e = tl.load(eta + p, mask=m_t, other=1.).to(tl.float32)
    return b_th, b_a, b_e


@triton.jit
def mini_batch_rows(q, k, v, theta, alpha, eta, row0, o_c, m_t, o_d, scale, D: tl.constexpr,
                    H: tl.constexpr):
    """The mini-batch's rows in float32: Q~ = scale Q, K, V (zeros past the sequence), then
    gate_rows."""
    b_q = load_rows(q + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32) * scale
    b_k = load_rows(k + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_v = load_rows(v + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_th, b_a, b_e = gate_rows(theta, alpha, eta, row0, o_c, m_t, H)
    return b_q, b_k, b_v, b_th, b_a, b_e


@triton.jit
def recon_grads(b_k, b_v, b_M, b_w, b_b, m_t, m_d, D: tl.constexpr, eps, HALF: tl.constexpr,
                PRECISION: tl.constexpr, MIXED: tl.constexpr):
    """(G, Z) [C, BD]: Z = K M0 (minibatch.dot_state, MIXED as the walks take it) and
    G = 2 ln_recon_grad(Z, V - K), 0 on the rows past the sequence."""
    b_z = dot_state(b_k, b_M, HALF, PRECISION, MIXED)
    return grads_from_z(b_z, b_k, b_v, b_w, b_b, m_t, m_d, D, eps), b_z


@triton.jit
def load_states(hs, ss, hr, sr, i_s, o_d, m_d, o_s, m_s, D: tl.constexpr, SCALED: tl.constexpr):
    """(M0, S0) of mini-batch i_s as the walk stored them, in float32 (SCALED: float16 rows
    times hr's, sr's inverse scales; chunk.HALF_STATES, HALF_STATES_BACKWARD)."""
    if SCALED:
        b_M = load_square_scaled(hs, hr, i_s, o_d, m_d, o_s, m_s, D)
        b_S = load_square_scaled(ss, sr, i_s, o_d, m_d, o_s, m_s, D)
    else:
        b_M = load_square(hs, i_s, o_s, m_s, D)
        b_S = load_square(ss, i_s, o_s, m_s, D)
    return b_M, b_S


@triton.jit
def stored_grads(b_k, b_v, b_M, zs, row0, o_c, m_t, o_d, m_d, b_w, b_b, D: tl.constexpr,
                 H: tl.constexpr, eps, HALF: tl.constexpr, PRECISION: tl.constexpr,
                 MIXED: tl.constexpr, ZS: tl.constexpr):
    """recon_grads' (G, Z), with ZS from the Z the walk stored in zs (HALF_STATES_BACKWARD)
    instead of K M0."""
    if ZS:
        b_z = load_rows(zs + row0 * D, o_c, m_t, o_d, D, H)
        b_g = grads_from_z(b_z, b_k, b_v, b_w, b_b, m_t, m_d, D, eps)
    else:
        b_g, b_z = recon_grads(b_k, b_v, b_M, b_w, b_b, m_t, m_d, D, eps, HALF, PRECISION,
                               MIXED)
    return b_g, b_z


@triton.jit
def grads_from_z(b_z, b_k, b_v, b_w, b_b, m_t, m_d, D: tl.constexpr, eps):
    """G = 2 ln_recon_grad(Z, V - K) [C, BD] from a given Z, 0 on the rows past the sequence."""
    b_g = 2. * ln_recon_grad_rows(b_z, b_v - b_k, b_w, b_b, m_d, D, eps)
    return tl.where(m_t[:, None], b_g, 0.)


@triton.jit
def dot_at(a, b, PRECISION: tl.constexpr):
    """a @ b at PRECISION (float32 operands)."""
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot_q(b_q, b_qh, b_x, scale, PRECISION: tl.constexpr, OMIXED: tl.constexpr):
    """Q~ @ b_x: of float32 Q~ (b_q) at PRECISION, or under OMIXED (chunk.OUTPUT_MIXED, for
    half-precision inputs) of Q's rows in their own dtype (b_qh), scaled after: with a float32
    b_x (a state) as utils.dot_mixed's OMIXED mode, with b_x in b_qh's dtype (K^T) one product
    of input rows (exact products, float32 sums)."""
    # one return: the compiler builds what follows a return inside a constexpr if
    if OMIXED == "" or b_qh.dtype == tl.float32:
        b_y = tl.dot(b_q, b_x.to(tl.float32), input_precision=PRECISION)
    elif b_x.dtype == tl.float32:
        b_y = dot_mixed(b_qh, b_x, PRECISION, OMIXED) * scale
    else:
        b_y = tl.dot(b_qh, b_x) * scale
    return b_y


@triton.jit
def outputs_bwd(b_q, b_k, b_g, b_do, b_M, b_S, b_th, b_F, b_f0, b_E, b_e0, b_w, b_b, o_c, m_d,
                D: tl.constexpr, eps, PRECISION: tl.constexpr):
    """Back through U and O: (dU, dQ~'s B part, dK's B part, dG's U part, dP, dp0, df0,
    dtheta's U part, dw, db); U recomputed. dQ~'s terms through the states are dq_state's."""
    b_P = dot_at(b_F, b_E, PRECISION)
    b_B = dot_at(b_q, tl.trans(b_k), PRECISION)
    b_qm = dot_at(b_q, b_M, PRECISION)
    b_qs = dot_at(b_q, b_S, PRECISION)
    return outputs_bwd_from(b_q, b_k, b_g, b_do, b_qm, b_qs, b_P, b_B, b_th, b_F, b_f0, b_e0,
                            b_w, b_b, o_c, m_d, D, eps, PRECISION)


@triton.jit
def outputs_bwd_from(b_q, b_k, b_g, b_do, b_qm, b_qs, b_P, b_B, b_th, b_F, b_f0, b_e0, b_w,
                     b_b, o_c, m_d, D: tl.constexpr, eps, PRECISION: tl.constexpr):
    """outputs_bwd from its products Q~ M0, Q~ S0, P = F E and B = Q~ K^T, taken by the caller
    in the order its shared memory needs."""
    b_p0 = tl.sum(b_F * b_e0[None, :], 1)
    b_W = b_P * b_th[None, :] * b_B
    b_u = b_f0[:, None] * b_qm + b_p0[:, None] * b_qs - dot_at(b_W, b_g, PRECISION)
    b_xu, b_su = layer_norm_rows(b_u, m_d, D, eps)
    b_dw = tl.sum(b_do * b_xu, 0)
    b_db = tl.sum(b_do, 0)
    b_du = b_do + layer_norm_bwd_rows(b_w[None, :] * b_do, b_xu, b_su, m_d, D)
    causal = o_c[:, None] >= o_c[None, :]
    b_dW = tl.where(causal, -dot_at(b_du, tl.trans(b_g), PRECISION), 0.)
    b_dB = b_dW * b_P * b_th[None, :]
    b_dq = dot_at(b_dB, b_k, PRECISION)
    return (b_du, b_dq, dot_at(tl.trans(b_dB), b_q, PRECISION),
            -dot_at(tl.trans(b_W), b_du, PRECISION), b_dW * b_th[None, :] * b_B, b_p0,
            tl.sum(b_du * b_qs, 1), tl.sum(b_du * b_qm, 1), tl.sum(b_dW * b_P * b_B, 0), b_dw,
            b_db)


@triton.jit
def dq_state(b_du, b_c, b_X, PRECISION: tl.constexpr):
    """dQ~'s term through one state X0 of U = c (Q~ X0) + ... (X0 = M0 with c = f0, S0 with
    c = p0): (c o dU) X0^T."""
    return dot_at(b_c[:, None] * b_du, tl.trans(b_X), PRECISION)


@triton.jit
def gates_bwd(b_dP, b_dp0, b_df0, b_dpn, b_dp0n, b_den, b_df0n, b_de0n, b_F, b_E, b_e0, b_Fx,
              b_f0x, b_Ex, b_e0x, last, o_c, PRECISION: tl.constexpr):
    """(d(1 - alpha), d eta) [C] from the gradients of P = F E, p0 = F e0 and of row n's
    P[n] = F[n] E, p0[n] = F[n] . e0, E[n], f0[n], e0[n]."""
    causal = o_c[:, None] >= o_c[None, :]
    b_fn = row_of(b_F, last)
    b_dfn = tl.sum(b_E * b_dpn[None, :], 1) + b_dp0n * b_e0
    b_dF = (dot_at(b_dP, tl.trans(b_E), PRECISION) + b_dp0[:, None] * b_e0[None, :]
            + tl.where(last[:, None], b_dfn[None, :], 0.))
    b_dE = (dot_at(tl.trans(b_F), b_dP, PRECISION) + b_fn[:, None] * b_dpn[None, :]
            + tl.where(last[:, None], b_den[None, :], 0.))
    b_df0 += tl.where(last, b_df0n, 0.)
    b_de0 = tl.sum(b_F * b_dp0[:, None], 0) + b_dp0n * b_fn + tl.where(last, b_de0n, 0.)
    b_da = segment_products_bwd(tl.where(causal, b_dF, 0.), b_df0, b_F, b_Fx, b_f0x, PRECISION)
    b_de = segment_products_bwd(tl.where(causal, b_dE, 0.), b_de0, b_E, b_Ex, b_e0x, PRECISION)
    return b_da, b_de
