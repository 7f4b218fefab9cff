"""kernels/common/utils.py's splits of a float32 operand into bfloat16 parts (split_bf16,
dot_mixed's "split_trunc"; split_thirds, its "split3"), through the interpreter."""

import pytest
import torch
import triton
import triton.language as tl

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
