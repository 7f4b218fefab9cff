"""The log-linear attention references (docs/operators.md section 5), in float64 on CPU.

The chunked Fenwick form must agree with the definition (outputs and the gradients of every
input); the definition is checked against hand-written sums: plain decayed linear attention
when every level weight is 1, and a single level picking out exactly its (t, s) pairs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from references.operators import levels_needed
from references.log_linear_attn import chunk_log_linear_attn_ref, naive_log_linear_attn

F64 = torch.float64
TOL = 1e-12


def make_inputs(B, T, G, H, K=8, V=8, extra_levels=0, max_len=None, gate=1 / 16, seed=0):
    """q, k, v ~ randn; g = gate * logsigmoid(randn); level_scales = sigmoid(randn)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    L = levels_needed(T if max_len is None else max_len) + extra_levels
    return dict(q=randn(B, T, G, K), k=randn(B, T, G, K), v=randn(B, T, H, V),
                g=gate * F.logsigmoid(randn(B, T, H)), level_scales=torch.sigmoid(randn(B, T, H, L)))


def assert_close(name, x, ref, tol=TOL):
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    diff = (x - ref).abs()
    err = (diff.norm() / ref.norm()).item() if ref.norm() > 0 else diff.norm().item()
    worst = tuple(torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}; worst at {worst}"


def compare_forms(inputs, **kwargs):
    """Chunk form vs the definition: o and the gradients of q, k, v, g, level_scales."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    ref, none_ref = naive_log_linear_attn(**leaves, **{k: v for k, v in kwargs.items() if k != "chunk_size"})
    out, none_out = chunk_log_linear_attn_ref(**leaves, **kwargs)
    assert none_ref is None and none_out is None
    assert out.dtype == ref.dtype == F64
    assert_close("o", out, ref)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1234), dtype=F64)
    names = list(leaves)
    g_ref = torch.autograd.grad(ref, [leaves[n] for n in names], up)
    g_out = torch.autograd.grad(out, [leaves[n] for n in names], up)
    for name, x, r in zip(names, g_out, g_ref):
        assert_close(f"d{name}", x, r)
    for name, x in inputs.items():  # inputs untouched
        assert torch.equal(x, leaves[name].detach()), f"{name} modified in place"
    return ref


CASES = {
    "T37_C8_G1": dict(B=2, T=37, G=1, H=4, chunk_size=8),
    "T37_C16_G2": dict(B=2, T=37, G=2, H=4, chunk_size=16),
    "T100_C8_G2_extra_level": dict(B=1, T=100, G=2, H=4, chunk_size=8, extra_levels=1),
    "T100_C16_G1_default_scale": dict(B=1, T=100, G=1, H=4, chunk_size=16, scale=None),
    "T64_C4": dict(B=1, T=64, G=2, H=2, chunk_size=4, scale=0.3),
    "T1_C8": dict(B=2, T=1, G=1, H=4, chunk_size=8),
    "T37_C64": dict(B=1, T=37, G=1, H=2, chunk_size=64),
    "T37_C1": dict(B=1, T=37, G=1, H=2, chunk_size=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_matches_naive(case):
    c = dict(CASES[case])
    kwargs = {k: c.pop(k) for k in ("chunk_size", "scale") if k in c}
    compare_forms(make_inputs(**c, seed=len(case)), **kwargs)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_varlen_with_empty_and_one_token_sequences(chunk_size):
    cu = [0, 0, 1, 38, 38, 60, 61]
    x = make_inputs(1, 61, 2, 4, max_len=37, seed=chunk_size)
    cu_t = torch.tensor(cu, dtype=torch.int64)
    o = compare_forms(x, cu_seqlens=cu_t, chunk_size=chunk_size)
    for bos, eos in zip(cu[:-1], cu[1:]):  # each sequence alone gives the same outputs
        if eos > bos:
            alone = {n: t[:, bos:eos] for n, t in x.items()}
            assert_close(f"o[{bos}:{eos}] alone", o[:, bos:eos], naive_log_linear_attn(**alone)[0])


@pytest.mark.parametrize("chunk_size", [8, 16])
def test_strong_gates(chunk_size):
    """g = 20 * logsigmoid(randn), down to about -60 per step: finite and still agreeing."""
    x = make_inputs(1, 100, 2, 4, gate=20.0, seed=7)
    assert x["g"].min() < -40
    compare_forms(x, chunk_size=chunk_size)


def test_all_levels_one_is_decayed_linear_attention():
    """level_scales = 1: o_t = sum_{s<=t} exp(G_t - G_s) scale <q_t, k_s> v_s, written as a loop."""
    B, T, G, H = 2, 13, 2, 4
    x = make_inputs(B, T, G, H, gate=0.5, seed=3)
    x["level_scales"] = torch.ones_like(x["level_scales"])
    expected = torch.zeros_like(x["v"])
    for b in range(B):
        for h in range(H):
            grp = h // (H // G)
            for t in range(T):
                for s in range(t + 1):
                    decay = torch.exp(x["g"][b, s + 1:t + 1, h].sum())
                    expected[b, t, h] += decay * 0.7 * (x["q"][b, t, grp] @ x["k"][b, s, grp]) * x["v"][b, s, h]
    assert_close("naive", naive_log_linear_attn(**x, scale=0.7)[0], expected)
    assert_close("chunk", chunk_log_linear_attn_ref(**x, scale=0.7, chunk_size=4)[0], expected)


def test_one_level_touches_only_its_pairs():
    """level_scales nonzero only at level 2: o_t sums exactly the s with bit_length(t ^ s) == 2."""
    B, T, G, H = 1, 21, 1, 2
    x = make_inputs(B, T, G, H, gate=0.5, seed=5)
    mask = torch.zeros_like(x["level_scales"])
    mask[..., 2] = 1
    x["level_scales"] = x["level_scales"] * mask
    expected = torch.zeros_like(x["v"])
    for h in range(H):
        for t in range(T):
            for s in range(t + 1):
                if s < t and (t ^ s).bit_length() == 2:
                    decay = torch.exp(x["g"][0, s + 1:t + 1, h].sum())
                    w = x["level_scales"][0, t, h, 2] * decay * (x["q"][0, t, 0] @ x["k"][0, s, 0])
                    expected[0, t, h] += w * x["v"][0, s, h]
    assert expected.abs().sum() > 0
    assert_close("naive", naive_log_linear_attn(**x)[0], expected)
    for chunk_size in (1, 2, 4, 8):
        assert_close(f"chunk {chunk_size}", chunk_log_linear_attn_ref(**x, chunk_size=chunk_size)[0], expected)


def test_low_precision_dtype():
    x = {n: t.to(torch.bfloat16) for n, t in make_inputs(1, 20, 1, 2, seed=9).items()}
    for fn in (naive_log_linear_attn, chunk_log_linear_attn_ref):
        o, _ = fn(**x)
        assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()


def test_too_few_levels_raises():
    x = make_inputs(1, 9, 1, 2, seed=1)  # T = 9 needs 5 levels
    x["level_scales"] = x["level_scales"][..., :4]
    for fn in (naive_log_linear_attn, chunk_log_linear_attn_ref):
        with pytest.raises(ValueError, match="levels"):
            fn(**x)


@pytest.mark.parametrize("chunk_size", [0, 3, 12, -4, 8.0, True])
def test_chunk_size_not_power_of_two_raises(chunk_size):
    x = make_inputs(1, 9, 1, 2, seed=1)
    with pytest.raises(ValueError, match="power of two"):
        chunk_log_linear_attn_ref(**x, chunk_size=chunk_size)
