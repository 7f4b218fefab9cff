"""The inner models' LayerNorm pieces inside a kernel (TTT-Linear and Titans, docs/operators.md
sections 3 and 4), row by row over a [C, BD] tile whose columns past D are masked:

    LN(z) = (z - mean(z)) / sigma,   sigma = sqrt(var(z) + eps)          var biased, over D
    g     = d(0.5 ||w * LN(z) + b - t||^2) / dz                           (the LayerNorm backward)
          = (D gx - sum(gx) - x sum(gx x)) / (D sigma),   x = LN(z), gx = w (w x + b - t)

references/_layernorm.py is the same math in float64 (Titans' loss has no 0.5: its gradient
is 2 g). Everything here is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.utils import INTERPRETED

__all__ = ["layer_norm_bwd_rows", "layer_norm_moments", "layer_norm_rows", "ln_recon_grad_bwd_cols",
           "ln_recon_grad_bwd_rows", "ln_recon_grad_bwd_sums", "ln_recon_grad_cols",
           "ln_recon_grad_moments", "ln_recon_grad_rows", "row_sums"]


# Triton's interpreter takes a reduction of two tiles element by element in Python, hundreds
# of times slower than a tl.sum: through it (the CPU tests) row_sums takes the two sums apart.
# With the pairs through the interpreter README's tests took 17 min 26 s on a 2-core machine
# (11 min 50 s apart; docs/testing.md); tests/test_kernels_ttt.py checks the paired form there
# too.
ROW_SUMS_APART = tl.constexpr(INTERPRETED)


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def row_sums(b_a, b_b):
    """(sum(a, 1), sum(b, 1)) of two [C, BD] tiles in one reduction: where a row is spread
    over several warps, one exchange between them instead of two. On an H100 (bfloat16, B=2,
    H=16, D=64, T=8192, 2026-12-06; python tools/kernel_profile.py ttt chunk --seq-len 8192
    --head-dim 64) TTT's forward went from 833 to 766 µs and fwd+bwd from 4,407 to 4,081 with
    its sums paired (Titans' 1,663 -> 1,610 and 6,480 -> 6,345). Two tl.sum under
    ROW_SUMS_APART."""
    if ROW_SUMS_APART:
        b_sa, b_sb = tl.sum(b_a, 1), tl.sum(b_b, 1)
    else:
        b_sa, b_sb = tl.reduce((b_a, b_b), 1, _add_pairs)
    return b_sa, b_sb


@triton.jit
def layer_norm_moments(b_z, m_d, D: tl.constexpr, eps):
    """(mean(z), sigma, z - mean(z)) of each row of b_z over its columns m_d (D of them); the
    other columns of b_z must be 0, and those of z - mean(z) come out 0."""
    b_mean = tl.sum(b_z, 1) / D
    b_zc = tl.where(m_d[None, :], b_z - b_mean[:, None], 0.)
    return b_mean, tl.sqrt(tl.sum(b_zc * b_zc, 1) / D + eps), b_zc


@triton.jit
def layer_norm_rows(b_z, m_d, D: tl.constexpr, eps):
    """(LN(z) [C, BD], sigma [C]) of each row of b_z over its columns m_d (D of them); the
    other columns of b_z must be 0, and come out 0."""
    _, b_sigma, b_zc = layer_norm_moments(b_z, m_d, D, eps)
    return b_zc / b_sigma[:, None], b_sigma


@triton.jit
def ln_recon_grad_rows(b_z, b_t, b_w, b_b, m_d, D: tl.constexpr, eps):
    """g [C, BD] = d(0.5 ||w * LN(z) + b - t||^2) / dz for each row of b_z (w, b [BD]; the
    columns past D of b_z, w and b must be 0; those of g come out 0)."""
    b_x, b_sigma = layer_norm_rows(b_z, m_d, D, eps)
    b_gx = b_w[None, :] * (b_w[None, :] * b_x + b_b[None, :] - b_t)
    b_s1, b_s2 = row_sums(b_gx, b_gx * b_x)
    b_g = (D * b_gx - b_s1[:, None] - b_x * b_s2[:, None]) / (D * b_sigma[:, None])
    return tl.where(m_d[None, :], b_g, 0.)


@triton.jit
def layer_norm_bwd_rows(b_dx, b_x, b_sigma, m_d, D: tl.constexpr):
    """dz [C, BD] of x = LN(z) per row, given dx (columns past D 0) and LN's x and sigma:
    (dx - mean(dx) - x mean(dx x)) / sigma."""
    b_s1, b_s2 = row_sums(b_dx, b_dx * b_x)
    return tl.where(m_d[None, :],
                    (b_dx - (b_s1 / D)[:, None] - b_x * (b_s2 / D)[:, None]) / b_sigma[:, None],
                    0.)


@triton.jit
def ln_recon_grad_bwd_rows(b_dg, b_z, b_t, b_w, b_b, m_d, D: tl.constexpr, eps):
    """The backward of ln_recon_grad_rows: given dg [C, BD] (rows that do not count: 0),
    (dz [C, BD], dt [C, BD], dw [BD], db [BD], g [C, BD]), dw and db summed over the rows, g
    the forward's value (every row: mask it where rows do not count). With
    g = P(gx) / sigma, P(y) = y - mean(y) - x mean(x y) (symmetric), gx = w r,
    r = w x + b - t, x = LN(z):

        dgx = P(dg) / sigma
        dx  = -(mean(gx x) dg + gx mean(dg x)) / sigma + w (w dgx)     (P's own x, then r's)
        dsigma = -sum(dg g) / sigma,     dz = LN backward of dx + dsigma x / D
        dw  = sum(dgx r + w dgx x),  db = sum(w dgx),  dt = -w dgx
    """
    b_x, b_sigma = layer_norm_rows(b_z, m_d, D, eps)
    b_r = b_w[None, :] * b_x + b_b[None, :] - b_t
    b_gx = b_w[None, :] * b_r
    b_s1, b_s2 = row_sums(b_gx, b_gx * b_x)
    b_g = (b_gx - (b_s1 / D)[:, None] - b_x * (b_s2 / D)[:, None]) / b_sigma[:, None]
    b_dgx = layer_norm_bwd_rows(b_dg, b_x, b_sigma, m_d, D)
    b_dr = b_dgx * b_w[None, :]
    b_s3, b_s4 = row_sums(b_dg * b_x, tl.where(m_d[None, :], b_dg * b_g, 0.))
    b_dx = (-((b_s2 / D)[:, None] * b_dg + b_gx * (b_s3 / D)[:, None]) / b_sigma[:, None]
            + b_dr * b_w[None, :])
    b_dsigma = -b_s4 / b_sigma
    b_dz = layer_norm_bwd_rows(b_dx, b_x, b_sigma, m_d, D) + (b_dsigma / D)[:, None] * b_x
    return b_dz, -b_dr, tl.sum(b_dgx * b_r + b_dr * b_x, 0), tl.sum(b_dr, 0), b_g


# ln_recon_grad_bwd_rows over a slice of the columns (a program that holds only some of each
# row): every sum over a row that depends on dg is one of five (sum dg, dg x, dg g, w^2 dg,
# w^2 x dg), each a sum of the slices' partial sums; the rest are sums of the forward's, which
# each slice takes from whole rows (ln_recon_grad_moments). With W0 = sum w^2, W1 = sum w^2 x,
# W2 = sum w^2 x^2 and A1..A5 the five sums, ln_recon_grad_bwd_rows's dx sums to
#     sum dx   = -(s2 A1 + s1 A2) / (D sigma) + (A4 - (W0 A1 + W1 A2) / D) / sigma
#     sum dx x = -2 s2 A2 / (D sigma)         + (A5 - (W1 A1 + W2 A2) / D) / sigma
# and dz = (dx - sum(dx) / D - x sum(dx x) / D - A3 x / D) / sigma: exact in real arithmetic.
# In float32 against float64 it came within 2% of the whole-row form's error on random, small
# and nearly constant rows at D = 64 and 128 (a NumPy study, not kept);
# tests/test_kernels_common.py holds the two forms within 2e-7 of each other.


@triton.jit
def ln_recon_grad_moments(b_z, b_t, b_w, b_b, m_d, D: tl.constexpr, eps):
    """What ln_recon_grad_cols and ln_recon_grad_bwd_cols take from whole rows z, t [C, BD]:
    (mean(z), sigma, s1 = sum(gx), s2 = sum(gx x), W1 = sum(w^2 x), W2 = sum(w^2 x^2)), [C]
    each; W0 = sum(w^2) is the head's."""
    b_mean, b_sigma, b_zc = layer_norm_moments(b_z, m_d, D, eps)
    b_x = b_zc / b_sigma[:, None]
    b_w2x = b_w[None, :] * b_w[None, :] * b_x
    b_gx = b_w[None, :] * (b_w[None, :] * b_x + b_b[None, :] - b_t)
    b_s1, b_s2 = row_sums(b_gx, b_gx * b_x)
    b_w1, b_w2 = row_sums(b_w2x, b_w2x * b_x)
    return b_mean, b_sigma, b_s1, b_s2, b_w1, b_w2


@triton.jit
def ln_recon_grad_cols(b_z, b_t, b_w, b_b, m_k, b_mean, b_sigma, b_s1, b_s2, D: tl.constexpr):
    """(x, r, g) [C, BV] on a slice of the columns (z, t, w, b of columns m_k; the rows'
    moments from ln_recon_grad_moments): x = LN(z), r = w x + b - t, g as ln_recon_grad_rows
    (0 past D)."""
    b_x = tl.where(m_k[None, :], (b_z - b_mean[:, None]) / b_sigma[:, None], 0.)
    b_r = b_w[None, :] * b_x + b_b[None, :] - b_t
    b_g = (b_w[None, :] * b_r - (b_s1 / D)[:, None] - b_x * (b_s2 / D)[:, None]) / b_sigma[:, None]
    return b_x, b_r, tl.where(m_k[None, :], b_g, 0.)


@triton.jit
def ln_recon_grad_bwd_sums(b_dg, b_x, b_g, b_w):
    """The five sums (A1..A5: dg, dg x, dg g, w^2 dg, w^2 x dg) of a slice of each row [C]."""
    b_w2dg = (b_w * b_w)[None, :] * b_dg
    b_a1, b_a2 = row_sums(b_dg, b_dg * b_x)
    b_a3, b_a4 = row_sums(b_dg * b_g, b_w2dg)
    return b_a1, b_a2, b_a3, b_a4, tl.sum(b_w2dg * b_x, 1)


@triton.jit
def ln_recon_grad_bwd_cols(b_dg, b_x, b_r, b_w, m_k, b_sigma, b_s1, b_s2, b_w1, b_w2, w0,
                           b_a1, b_a2, b_a3, b_a4, b_a5, D: tl.constexpr):
    """ln_recon_grad_bwd_rows on a slice of the columns: (dz, dt [C, BV], dw, db [BV] summed
    over the rows) from the slice's dg, x, r, w (ln_recon_grad_cols), the rows' moments
    (ln_recon_grad_moments; w0 = sum w^2) and the whole rows' five sums."""
    b_sg = b_sigma[:, None]
    b_dgx = (b_dg - (b_a1 / D)[:, None] - b_x * (b_a2 / D)[:, None]) / b_sg
    b_dr = b_dgx * b_w[None, :]
    b_dx = -(b_s2[:, None] * b_dg + (b_w[None, :] * b_r) * b_a2[:, None]) / (D * b_sg) \
        + b_dr * b_w[None, :]
    b_sdx = (-(b_s2 * b_a1 + b_s1 * b_a2) / D + b_a4 - (w0 * b_a1 + b_w1 * b_a2) / D) / b_sigma
    b_sdxx = (-2. * b_s2 * b_a2 / D + b_a5 - (b_w1 * b_a1 + b_w2 * b_a2) / D) / b_sigma
    b_dz = (b_dx - (b_sdx / D)[:, None] - b_x * ((b_sdxx + b_a3) / D)[:, None]) / b_sg
    return (tl.where(m_k[None, :], b_dz, 0.), -b_dr, tl.sum(b_dgx * b_r + b_dr * b_x, 0),
            tl.sum(b_dr, 0))
