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

__all__ = ["layer_norm_bwd_rows", "layer_norm_rows", "ln_recon_grad_bwd_rows", "ln_recon_grad_rows",
           "row_sums"]


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
def layer_norm_rows(b_z, m_d, D: tl.constexpr, eps):
    """(LN(z) [C, BD], sigma [C]) of each row of b_z over its columns m_d (D of them); the
    other columns of b_z must be 0, and come out 0."""
    b_mean = tl.sum(b_z, 1) / D
    b_zc = tl.where(m_d[None, :], b_z - b_mean[:, None], 0.)
    b_sigma = tl.sqrt(tl.sum(b_zc * b_zc, 1) / D + eps)
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
