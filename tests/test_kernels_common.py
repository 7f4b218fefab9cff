"""kernels/common/utils.py's splits of a float32 operand into bfloat16 parts (split_bf16,
dot_mixed's "split_trunc"; split_thirds, its "split3"), and kernels/common/layernorm.py's
LayerNorm backward by column slices, through the interpreter."""

import pytest
import torch
import triton
import triton.language as tl

from kernels.common.layernorm import (ln_recon_grad_bwd_cols, ln_recon_grad_bwd_rows,
                                      ln_recon_grad_bwd_sums, ln_recon_grad_cols,
                                      ln_recon_grad_moments)
from kernels.common.utils import dot_mixed, split_bf16, split_thirds


@triton.jit
def _halves(x, hi, lo, N: tl.constexpr):
    o = tl.arange(0, N)
    b_hi, b_lo = split_bf16(tl.load(x + o))
    tl.store(hi + o, b_hi.to(tl.float32))
    tl.store(lo + o, b_lo.to(tl.float32))


def test_split_bf16_keeps_fifteen_bits():
    # hi is x's upper 16 bits exactly (truncated, not rounded); x - hi is exact in float32 and
    # under 2^-7 |x|, and lo rounds it to bfloat16's 8 bits: |x - hi - lo| < 2^-15 |x| whichever
    # way the conversion rounds (measured 2.6e-5 = 2^-15.2 here, whose bfloat16 conversion
    # truncates). hi alone is off by up to 2^-7 (lo dropped fails the bound), a wrong shift or
    # mask the bit test. (hi rounded by a conversion would too on a GPU; the interpreter's
    # conversion truncates, so it cannot tell that one here.)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=g) * 2.0 ** torch.randint(-30, 30, (256,), generator=g)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _halves[(1,)](x, hi, lo, 256)
    assert torch.equal(hi.view(torch.int32), x.view(torch.int32) & -65536)
    assert ((x.double() - hi.double() - lo.double()).abs() <= 2.0 ** -15 * x.double().abs()).all()


@triton.jit
def _thirds(x, hi, mid, lo, N: tl.constexpr):
    o = tl.arange(0, N)
    b_hi, b_mid, b_lo = split_thirds(tl.load(x + o), tl.bfloat16)
    tl.store(hi + o, b_hi.to(tl.float32))
    tl.store(mid + o, b_mid.to(tl.float32))
    tl.store(lo + o, b_lo.to(tl.float32))


def test_split_thirds_keeps_every_bit_of_a_float32():
    # hi is x's upper 16 bits, mid the upper 16 of x - hi (both exact in float32), and what is
    # left has at most 24 - 16 = 8 significant bits: bfloat16 holds it, so hi + mid + lo is x
    # exactly, however the last conversion rounds. Without lo it is off by up to 2^-16 |x|.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=g) * 2.0 ** torch.randint(-30, 30, (256,), generator=g)
    hi, mid, lo = (torch.empty_like(x) for _ in range(3))
    _thirds[(1,)](x, hi, mid, lo, 256)
    assert torch.equal(hi.view(torch.int32), x.view(torch.int32) & -65536)
    assert torch.equal(mid.view(torch.int32), (x - hi).view(torch.int32) & -65536)
    assert torch.equal(hi.double() + mid.double() + lo.double(), x.double())


@triton.jit
def _dot(a, s, y, R: tl.constexpr, N: tl.constexpr, MIXED: tl.constexpr):
    o_r, o_n = tl.arange(0, R), tl.arange(0, N)
    b_a = tl.load(a + o_r[:, None] * N + o_n[None, :])
    b_s = tl.load(s + o_n[:, None] * N + o_n[None, :])
    tl.store(y + o_r[:, None] * N + o_n[None, :], dot_mixed(b_a, b_s, "ieee", MIXED))


@pytest.mark.parametrize("mixed", ["split3", "split"])
def test_dot_mixed_split3_takes_the_state_whole(mixed):
    # Rows of a permutation (float16: the interpreter takes no bfloat16 products) pick rows of
    # a float32 state [64, 64] whose values have 24-bit significands in [1, 512): "split3" in
    # float16 holds each value whole as three parts (11 bits each, the last no finer than
    # float16's 2^-24), so the product is the state's rows exactly; "split" keeps ~22 bits
    # and must not be, nor must "split3" with a part dropped.
    g = torch.Generator().manual_seed(1)
    s = ((1 + torch.randint(0, 2 ** 23, (64, 64), generator=g) / 2 ** 23)
         * 2.0 ** torch.randint(0, 9, (64, 64), generator=g))
    perm = torch.randperm(64, generator=g)[:16]
    a = torch.eye(64)[perm].half()
    y = torch.empty(16, 64)
    _dot[(1,)](a, s, y, 16, 64, mixed)
    assert torch.equal(y, s[perm]) == (mixed == "split3")


@triton.jit
def _half(z, t, w, b, i, b_mean, b_sigma, b_s1, b_s2, o_c, D: tl.constexpr, BV: tl.constexpr):
    # half i of the columns: their offsets, mask, w, and ln_recon_grad_cols's x, r, g
    o_v = i * BV + tl.arange(0, BV)
    m_v = o_v < D
    p_v = o_c[:, None] * D + o_v[None, :]
    b_wv = tl.load(w + o_v, mask=m_v, other=0.)
    b_x, b_r, b_g = ln_recon_grad_cols(tl.load(z + p_v, mask=m_v[None, :], other=0.),
                                       tl.load(t + p_v, mask=m_v[None, :], other=0.), b_wv,
                                       tl.load(b + o_v, mask=m_v, other=0.), m_v, b_mean,
                                       b_sigma, b_s1, b_s2, D)
    return o_v, p_v, m_v, b_wv, b_x, b_r, b_g


@triton.jit
def _ln_bwd(z, t, w, b, dg, out, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
            HALVES: tl.constexpr):
    # ln_recon_grad_bwd_rows whole (HALVES False), or on the two halves of the columns, half
    # 0's five sums added to half 1's as a pair of walk programs add them; out [C + 2, BD]
    # holds dz, then dw and db (dt is -w dgx: checked through dw)
    o_c, o_d = tl.arange(0, C), tl.arange(0, BD)
    m_d = o_d < D
    p = o_c[:, None] * D + o_d[None, :]
    b_z = tl.load(z + p, mask=m_d[None, :], other=0.)
    b_t = tl.load(t + p, mask=m_d[None, :], other=0.)
    b_w = tl.load(w + o_d, mask=m_d, other=0.)
    b_b = tl.load(b + o_d, mask=m_d, other=0.)
    if HALVES:
        b_mean, b_sigma, b_s1, b_s2, b_w1, b_w2 = ln_recon_grad_moments(b_z, b_t, b_w, b_b, m_d,
                                                                        D, 1e-5)
        _, p0, m0, b_w0, b_x0, _, b_g0 = _half(z, t, w, b, 0, b_mean, b_sigma, b_s1, b_s2, o_c,
                                               D, BD // 2)
        a1, a2, a3, a4, a5 = ln_recon_grad_bwd_sums(
            tl.load(dg + p0, mask=m0[None, :], other=0.), b_x0, b_g0, b_w0)
        o_v, p_v, m_v, b_wv, b_x, b_r, b_g = _half(z, t, w, b, 1, b_mean, b_sigma, b_s1, b_s2,
                                                   o_c, D, BD // 2)
        b_dg = tl.load(dg + p_v, mask=m_v[None, :], other=0.)
        h1, h2, h3, h4, h5 = ln_recon_grad_bwd_sums(b_dg, b_x, b_g, b_wv)
        b_dz, _, b_dw, b_db = ln_recon_grad_bwd_cols(
            b_dg, b_x, b_r, b_wv, m_v, b_sigma, b_s1, b_s2, b_w1, b_w2, tl.sum(b_w * b_w, 0),
            a1 + h1, a2 + h2, a3 + h3, a4 + h4, a5 + h5, D)
    else:
        o_v = o_d
        b_dz, _, b_dw, b_db, _ = ln_recon_grad_bwd_rows(tl.load(dg + p, mask=m_d[None, :],
                                                                other=0.),
                                                        b_z, b_t, b_w, b_b, m_d, D, 1e-5)
    tl.store(out + o_c[:, None] * BD + o_v[None, :], b_dz)
    tl.store(out + C * BD + o_v, b_dw)
    tl.store(out + (C + 1) * BD + o_v, b_db)


@pytest.mark.parametrize("rows", ["random", "small", "near_constant"])
def test_ln_recon_grad_bwd_by_column_halves(rows):
    # The LayerNorm backward of a walk whose programs each hold half of every row
    # (layernorm.ln_recon_grad_bwd_cols, kernels/titans/walk_bwd.py's pairs) against the
    # whole-row form on the second half's columns, D = 48 in a 64-wide tile (that half partly
    # past D), the five sums of both halves added: the same math with its sums in another
    # order, so within float32 rounding of each other: measured <= 2e-7 relative (dz, dw, db)
    # on every kind of row; half 0's w^2 x dg sum left out moves dz by 1.2e-2 to 0.22.
    g = torch.Generator().manual_seed(2)
    C, D = 16, 48
    z = torch.randn(C, D, generator=g)
    if rows == "small":
        z = z * 1e-3
    elif rows == "near_constant":
        z = 3. + 1e-2 * z
    t, dg = torch.randn(C, D, generator=g), torch.randn(C, D, generator=g)
    w, b = 1 + 0.3 * torch.randn(D, generator=g), 0.3 * torch.randn(D, generator=g)
    got, want = (torch.zeros(C + 2, 64) for _ in range(2))
    _ln_bwd[(1,)](z, t, w, b, dg, got, D, C, 64, True)
    _ln_bwd[(1,)](z, t, w, b, dg, want, D, C, 64, False)
    for name, at in (("dz", slice(0, C)), ("dw", slice(C, C + 1)), ("db", slice(C + 1, C + 2))):
        err = ((got[at, 32:D] - want[at, 32:D]).norm() / want[at, 32:D].norm()).item()
        assert err < 2e-6, (name, err)
