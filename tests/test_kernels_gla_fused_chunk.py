"""fused_chunk_gla (Triton, through the interpreter) against the float64 recurrence, and beside
chunk_gla, whose intra-chunk stage its walk shares.

float32 bound 1e-5 (the issue's bar), as for chunk_gla (tests/test_kernels_gla_chunk.py says
why it holds): exact float32 products over at most 64 tokens and K <= 40 here; measured 5e-8
to 4e-7. Against chunk_gla 1e-6: the same products, summed in another order (the state's in
one product over the whole key width, A's over 64-wide key tiles). A wrong exponent, a missed
block or a state not carried is >= 1e-3.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.check.engine import rel_error
from kernels.gla import chunk_gla, fused_chunk_gla
from references.gla import naive_recurrent_gla


def inputs(B, T, H, K, V, h0=True, cu=None, strong=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = B if cu is None else len(cu) - 1
    x = {"q": torch.randn(B, T, H, K, generator=g), "k": torch.randn(B, T, H, K, generator=g),
         "v": torch.randn(B, T, H, V, generator=g),
         "g": (-5 - 55 * torch.rand(B, T, H, K, generator=g) if strong
               else F.logsigmoid(torch.randn(B, T, H, K, generator=g)) / 4)}
    s0 = torch.randn(N, H, K, V, generator=g) if h0 else None
    return x, s0, None if cu is None else torch.tensor(cu)


def forward(fn, x, s0, cu, dtype=torch.float32):
    with torch.no_grad():
        return fn(*(x[n].to(dtype) for n in "qkvg"),
                  initial_state=None if s0 is None else s0.to(dtype), output_final_state=True,
                  cu_seqlens=cu)


# T = 70: a tail chunk of 6; 130: three chunks; K = 20, V = 40: not powers of two; T = 1;
# K = 72: the walk's value tile of 32 (above 64 keys) and A's two key tiles
@pytest.mark.parametrize("B, T, H, K, V, h0", [(1, 70, 2, 16, 16, True), (2, 130, 1, 20, 40, True),
                                               (2, 1, 1, 16, 16, True), (1, 65, 1, 72, 40, False)])
def test_forward_matches_reference_and_chunk_gla(B, T, H, K, V, h0):
    x, s0, cu = inputs(B, T, H, K, V, h0)
    o, ht = forward(fused_chunk_gla, x, s0, cu)
    r, rt = forward(naive_recurrent_gla, x, s0, cu, torch.float64)
    c, ct = forward(chunk_gla, x, s0, cu)
    assert rel_error(o, r) < 1e-5 and rel_error(ht, rt) < 1e-5
    assert rel_error(o, c) < 1e-6 and rel_error(ht, ct) < 1e-6


def test_varlen_with_empty_and_one_token_sequences():
    x, s0, cu = inputs(1, 150, 2, 16, 16, cu=[0, 0, 1, 70, 70, 150])
    (o, ht), (r, rt) = forward(fused_chunk_gla, x, s0, cu), forward(naive_recurrent_gla, x, s0, cu,
                                                                     torch.float64)
    assert rel_error(o, r) < 1e-5 and rel_error(ht, rt) < 1e-5
    assert torch.equal(ht[0], s0[0]) and torch.equal(ht[3], s0[3])  # empty: the state unchanged


def test_strong_gates_never_overflow():
    """Log gates in [-60, -5] per step: numpy raises on any overflow or NaN in the
    interpreter's arithmetic; every exponent the walk takes is <= 0."""
    x, s0, cu = inputs(1, 200, 1, 16, 16, strong=True)
    with np.errstate(over="raise", invalid="raise"):
        o, ht = forward(fused_chunk_gla, x, s0, cu)
    r, rt = forward(naive_recurrent_gla, x, s0, cu, torch.float64)
    assert rel_error(o, r) < 1e-5 and rel_error(ht, rt) < 1e-5


def test_gradients_match_reference():
    """The backward: the states and A recomputed with chunk_gla's stages, then its backward."""
    x, s0, cu = inputs(1, 130, 1, 20, 24, cu=[0, 1, 130])
    out = {}
    for name, fn, dtype in (("ours", fused_chunk_gla, torch.float32),
                            ("ref", naive_recurrent_gla, torch.float64)):
        xs = {n: t.to(dtype).clone().requires_grad_() for n, t in x.items()}
        h0 = s0.to(dtype).clone().requires_grad_()
        o, ht = fn(xs["q"], xs["k"], xs["v"], xs["g"], initial_state=h0, output_final_state=True,
                   cu_seqlens=cu)
        gen = torch.Generator().manual_seed(1)
        do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
        ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
        out[name] = {"o": o, "ht": ht, "dh0": h0.grad, **{"d" + n: t.grad for n, t in xs.items()}}
    for name in out["ref"]:
        assert rel_error(out["ours"][name], out["ref"][name]) < 1e-5, name


def test_bad_input_is_refused_before_any_launch():
    x, s0, cu = inputs(1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="K and V must be <= 256"):
        fused_chunk_gla(x["q"].new_zeros(1, 8, 1, 260), x["k"].new_zeros(1, 8, 1, 260), x["v"],
                        x["g"].new_zeros(1, 8, 1, 260))
    with pytest.raises((ValueError, TypeError), match="g"):
        fused_chunk_gla(x["q"], x["k"], x["v"], x["g"][..., :8])
