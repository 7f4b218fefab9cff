"""kernels/common/utils.py's split of a float32 operand into two bfloat16 halves (split_bf16,
dot_mixed's "split_trunc"), through the interpreter."""

import torch
import triton
import triton.language as tl

from kernels.common.utils import split_bf16


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
