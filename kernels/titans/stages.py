"""Titans' kernel stages shared by the forward (kernels/titans/chunk.py) and the backward
(kernels/titans/chunk_bwd.py): a mini-batch's rows, its reconstruction gradients, and the
segment products of its gate factors with their backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.layernorm import ln_recon_grad_rows
from kernels.common.utils import load_rows

__all__ = ["mini_batch_rows", "recon_grads", "segment_products", "segment_products_bwd"]


@triton.jit
def _segment(b_lo, b_zo, b_l, b_z, live):
    """exp(b_lo[i] - b_l[j]) where live and no zero factor lies between (b_zo[i] == b_z[j])."""
    live = live & (b_zo[:, None] == b_z[None, :])
    return tl.where(live, tl.exp(tl.where(live, b_lo[:, None] - b_l[None, :], 0.).to(tl.float32)),
                    0.)


@triton.jit
def segment_products(b_f, o_c):
    """(F, f0, Fx, f0x) of factors b_f [C] in [0, 1]: F[i, j] = prod_{j < r <= i} f_r (0 for
    j > i), f0[i] = prod_{r <= i} f_r, and the same ending one factor earlier, for the
    backward: Fx[i, j] = F[i - 1, j] (0 for j >= i), f0x[i] = f0[i - 1] (1 at i = 0). Logs
    summed in float64, zero factors counted apart (a segment over one is an exact 0)."""
    b_lr = tl.log(tl.where(b_f > 0, b_f, 1.)).to(tl.float64)
    b_zr = (b_f == 0).to(tl.int32)
    b_l = tl.cumsum(b_lr, 0)
    b_z = tl.cumsum(b_zr, 0)
    b_lx, b_zx = b_l - b_lr, b_z - b_zr
    b_F = _segment(b_l, b_z, b_l, b_z, o_c[:, None] >= o_c[None, :])
    b_Fx = _segment(b_lx, b_zx, b_l, b_z, o_c[:, None] > o_c[None, :])
    return (b_F, tl.where(b_z == 0, tl.exp(b_l.to(tl.float32)), 0.), b_Fx,
            tl.where(b_zx == 0, tl.exp(b_lx.to(tl.float32)), 0.))


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
def mini_batch_rows(q, k, v, theta, alpha, eta, row0, o_c, m_t, o_d, scale, D: tl.constexpr,
                    H: tl.constexpr):
    """The mini-batch's rows in float32: Q~ = scale Q, K, V (zeros past the sequence), theta
    (0 past it), 1 - alpha and eta (1 past it)."""
    b_q = load_rows(q + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32) * scale
    b_k = load_rows(k + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_v = load_rows(v + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    p = row0 + o_c * H
    b_th = tl.load(theta + p, mask=m_t, other=0.).to(tl.float32)
    b_a = 1. - tl.load(alpha + p, mask=m_t, other=0.).to(tl.float32)
    b_e = tl.load(eta + p, mask=m_t, other=1.).to(tl.float32)
    return b_q, b_k, b_v, b_th, b_a, b_e


@triton.jit
def recon_grads(b_k, b_v, b_M, b_w, b_b, m_t, m_d, D: tl.constexpr, eps,
                PRECISION: tl.constexpr):
    """G [C, BD] = 2 ln_recon_grad(K M0, V - K), 0 on the rows past the sequence."""
    b_z = tl.dot(b_k, b_M, input_precision=PRECISION)
    b_g = 2. * ln_recon_grad_rows(b_z, b_v - b_k, b_w, b_b, m_d, D, eps)
    return tl.where(m_t[:, None], b_g, 0.)
