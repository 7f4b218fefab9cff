"""chunk_titans_linear (Triton, through the interpreter) against the token-by-token float64
reference (references.titans.naive_titans_linear): the output and both final states.

float32 bound 1e-5: every product multiplies float32 operands exactly ("ieee") over at most 64
tokens and D <= 32 here, the LayerNorms are float32 sums over D, and the gates' segment
products are exp of float64 differences rounded to float32; measured 1e-7 to 3e-7. A padded
row reaching the update, the state carried from the wrong row of a partial mini-batch, a
momentum or forgetting factor off by one token, or a zero factor turned into 0/0 is >= 1e-3
(or nan).
"""

import pytest
import torch

from harness.check.engine import rel_error
from kernels.titans import chunk_titans_linear
from references.titans import naive_titans_linear

import walk_grads  # tests/walk_grads.py


def inputs(B, T, H, D, h0=True, s0=True, cu=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = B if cu is None else len(cu) - 1
    x = {n: torch.randn(B, T, H, D, generator=g) for n in "qkv"}
    x["w"] = 1 + 0.1 * torch.randn(H, D, generator=g)
    x["b"] = 0.1 * torch.randn(H, D, generator=g)
    x["theta"] = 0.05 * torch.rand(B, T, H, generator=g)
    x["alpha"] = 0.1 * torch.rand(B, T, H, generator=g)
    x["eta"] = 0.5 + 0.5 * torch.rand(B, T, H, generator=g)
    st = {"initial_state": 0.1 * torch.randn(N, H, D, D, generator=g) if h0 else None,
          "initial_momentum": 0.1 * torch.randn(N, H, D, D, generator=g) if s0 else None}
    return x, st, None if cu is None else torch.tensor(cu)


NAMES = ("q", "k", "v", "w", "b", "theta", "alpha", "eta")


def both(x, st, cu, chunk_size=16, dtype=torch.float32):
    """(kernel's (o, M, S), reference's) on the same inputs, q, k, v in ``dtype``."""
    args = {"chunk_size": chunk_size, "output_final_state": True, "cu_seqlens": cu}
    half = {n: (t.to(dtype) if n in "qkv" else t) for n, t in x.items()}
    got = chunk_titans_linear(*(half[n] for n in NAMES), **st, **args)
    ref = naive_titans_linear(*(half[n].double() for n in NAMES),
                              **{n: None if s is None else s.double() for n, s in st.items()},
                              **args)
    return got, ref


def check(got, ref, bound):
    for name, a, r in zip(("o", "final state", "final momentum"), got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_error(a, r) < bound, (name, rel_error(a, r))


# T = 70: a last mini-batch of 6; D = 20: not a power of two; chunk sizes 32 and 64 with partial
# last mini-batches; T = 1; no initial state; the memory or the momentum alone
@pytest.mark.parametrize("B,T,H,D,chunk_size,kw", [
    (2, 70, 2, 16, 16, {}),
    (1, 37, 1, 20, 16, {}),
    (1, 100, 1, 16, 32, {}),
    (1, 70, 2, 32, 64, {}),
    (2, 1, 1, 16, 16, {}),
    (1, 40, 2, 16, 16, {"h0": False, "s0": False}),
    (1, 40, 1, 16, 16, {"s0": False}),
    (1, 40, 1, 16, 16, {"h0": False}),
])
def test_forward_and_final_states(B, T, H, D, chunk_size, kw):
    x, st, cu = inputs(B, T, H, D, **kw)
    check(*both(x, st, cu, chunk_size), 1e-5)


def test_varlen_with_empty_and_one_token_sequences():
    """Sequences of 21, 0, 1 and 35 tokens: each ends in its own partial mini-batch, the empty
    one's final states are its initial ones."""
    x, st, cu = inputs(1, 57, 2, 16, cu=[0, 21, 21, 22, 57])
    got, ref = both(x, st, cu)
    check((got[0], got[1], got[2]), ref, 1e-5)
    assert torch.equal(got[1][1], st["initial_state"][1])


def test_zero_factors_and_underflow():
    """alpha = 1 (forget everything) and eta = 0 (drop the momentum) are factors of exactly 0:
    segments over them are exact zeros, not 0/0; forgetting factors of 1e-6 over a whole
    mini-batch underflow float32 (1e-96) inside it. All finite and within 1e-5."""
    x, st, cu = inputs(1, 70, 2, 16)
    x["alpha"][0, 5] = 1.
    x["alpha"][0, 17:19] = 1.
    x["eta"][0, 9] = 0.
    x["eta"][0, 33:36] = 0.
    x["alpha"][0, 48:64] = 1 - 1e-6
    check(*both(x, st, cu), 1e-5)


def test_float16_within_its_rounding():
    """float16 q, k, v (the rest float32): o within 1e-3 of float64 on the same rounded inputs
    (float16's unit roundoff is 4.9e-4, o is stored in float16; measured 2e-4); the final
    states stay float32 (1e-5)."""
    x, st, cu = inputs(1, 70, 2, 16)
    got, ref = both(x, st, cu, dtype=torch.float16)
    assert got[0].dtype == torch.float16
    assert rel_error(got[0], ref[0]) < 1e-3
    assert rel_error(got[1], ref[1]) < 1e-5 and rel_error(got[2], ref[2]) < 1e-5


def test_bad_arguments_raise_before_any_launch():
    x, st, _ = inputs(1, 16, 1, 16)
    args = [x[n] for n in NAMES]
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        chunk_titans_linear(*args, chunk_size=8)
    x, _, _ = inputs(1, 16, 1, 256)
    with pytest.raises(ValueError, match="D must be <= 128"):
        chunk_titans_linear(*(x[n] for n in NAMES))
    x, _, _ = inputs(1, 16, 1, 128)
    with pytest.raises(ValueError, match="chunk_size=32 takes D <= 64"):
        chunk_titans_linear(*(x[n] for n in NAMES), chunk_size=32)


def grads(fn, x, st, cu, chunk_size, dtype, seed=1):
    """Every gradient of <o, dO> + <final M, dM> + <final S, dS> (fixed random dO, dM, dS), the
    inputs in ``dtype`` (None: as given)."""
    return walk_grads.grads(fn, NAMES, x, st, cu, chunk_size, dtype, seed)


# a partial last mini-batch; D = 20; chunk 32 with the memory alone; no initial state; varlen
# with empty and one-token sequences; zero gate factors
@pytest.mark.parametrize("B,T,H,D,chunk_size,kw", [
    (1, 40, 2, 16, 16, {}),
    (2, 37, 1, 20, 16, {}),
    (1, 70, 1, 32, 32, {"s0": False}),
    (1, 40, 1, 16, 16, {"h0": False, "s0": False}),
    (1, 57, 2, 16, 16, {"cu": [0, 21, 21, 22, 57]}),
])
def test_gradients(B, T, H, D, chunk_size, kw):
    """Every gradient within 1e-5 of autograd through the float64 reference (float32, the same
    products and sums as the forward's; measured 1.2e-7 to 3.6e-7)."""
    x, st, cu = inputs(B, T, H, D, **kw)
    got = grads(chunk_titans_linear, x, st, cu, chunk_size, torch.float32)
    ref = grads(naive_titans_linear, x, st, cu, chunk_size, torch.float64)
    assert set(got) == set(ref)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_gradients_at_zero_factors():
    """alpha = 1 and eta = 0 inside mini-batches: the gradients of those factors are the
    products of the others (the reference's segment products take them so), finite, within
    1e-5."""
    x, st, cu = inputs(1, 40, 1, 16)
    x["alpha"][0, 5] = 1.
    x["alpha"][0, 17:19] = 1.
    x["eta"][0, 9] = 0.
    x["eta"][0, 33:36] = 0.
    got = grads(chunk_titans_linear, x, st, cu, 16, torch.float32)
    ref = grads(naive_titans_linear, x, st, cu, 16, torch.float64)
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))
