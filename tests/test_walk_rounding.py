"""tools/walk_rounding.py: the product modes' roundings and the rounded matrix form of Titans."""

import importlib.util
from pathlib import Path

import pytest
import torch

from harness.check.engine import rel_error
from references.titans import chunk_titans_linear_ref

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("walk_rounding", ROOT / "tools" / "walk_rounding.py")
walk_rounding = importlib.util.module_from_spec(spec)
spec.loader.exec_module(walk_rounding)


# The bits a mode keeps of a float32 state: "split_trunc" a truncated bfloat16 half (under
# 2^-7 of the value left) and the rest rounded to bfloat16 (half of its 2^-7: 2^-15 in all),
# "split" both rounded (2^-16), "tf32" 11 bits (2^-11), "tf32x2" 11 + 11 (2^-21), "split3"
# every bit (two truncated 8-bit parts, 8 bits left: 0); measured on 10,000 normal values:
# 1.5e-5, 7.4e-6, 4.8e-4, 1.2e-7, 0. A mode that dropped its second part would sit at the
# first part's 2^-8, "split3" without its third at 2^-16.
@pytest.mark.parametrize("mode,bound", [("split_trunc", 2 ** -15), ("split", 2 ** -16),
                                        ("tf32", 2 ** -11), ("tf32x2", 2 ** -21),
                                        ("split3", 0.0)])
def test_rounded_keeps_its_bits(mode, bound):
    x = torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x32 = x.float().double()
    err = ((walk_rounding.rounded(x, mode) - x32).abs() / x32.abs()).max().item()
    assert err <= bound, err
    assert walk_rounding.rounded(x, "") is x


def test_exact_form_is_the_reference():
    """With both modes exact the emulated form is references.titans' matrix form: o within
    1e-12 (measured 0), the final states, returned in float32 as a kernel's, and every gradient,
    which their float32 upstream gradients reach, within 1e-7 (measured <= 2.9e-8). Without
    M's transpose in the backward's dZ M^T, dK is 0.71 off."""
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 1, 40, 2, 8
    x = {n: torch.randn(B, T, H, D, dtype=torch.float64, generator=g) for n in "qkv"}
    x.update(w=1 + 0.1 * torch.randn(H, D, dtype=torch.float64, generator=g),
             b=0.1 * torch.randn(H, D, dtype=torch.float64, generator=g),
             theta=0.05 * torch.rand(B, T, H, dtype=torch.float64, generator=g),
             alpha=0.1 * torch.rand(B, T, H, dtype=torch.float64, generator=g),
             eta=0.5 + 0.5 * torch.rand(B, T, H, dtype=torch.float64, generator=g),
             initial_state=0.1 * torch.randn(B, H, D, D, dtype=torch.float64, generator=g),
             initial_momentum=0.1 * torch.randn(B, H, D, D, dtype=torch.float64, generator=g))

    def grads(fn):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        out = fn(**leaves, output_final_state=True)
        sum((y.double() * torch.randn(y.shape, dtype=torch.float64, generator=
             torch.Generator().manual_seed(i))).sum() for i, y in enumerate(out)).backward()
        return [y.double() for y in out] + [leaves[n].grad for n in x]

    got = grads(walk_rounding.emulated("", ""))
    ref = grads(chunk_titans_linear_ref)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert rel_error(a, r) < (1e-12 if i == 0 else 1e-7), (i, rel_error(a, r))
