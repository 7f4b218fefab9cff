"""fused_recurrent_gla (Triton, through the interpreter) against the float64 recurrence.

float32 bound 1e-5 (the issue's bar): the kernel's sums run over K or V (<= 40 here) and its
states over at most 200 steps of factors in [0, 1]; o, the states, dq, dk, dv measure 1e-7 to
2e-7. The gates' gradients sum per-token terms over the rest of their chunk of 64 from an exact
anchor, 3e-7 to 7e-7 here (from the whole rest of the sequence they measured 1.2e-6 at T = 256
and 2.7e-6 at 2048 with log gates 20 logsigmoid(x)); any wrong term is >= 1e-3.
"""

import pytest
import torch
import torch.nn.functional as F

from harness.check.engine import rel_error
from kernels.gla import fused_recurrent_gla
from references.gla import naive_recurrent_gla

f32, f64 = torch.float32, torch.float64


def inputs(B, T, H, K, V, gk=True, gv=False, strong=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, H, K, generator=g), "k": torch.randn(B, T, H, K, generator=g),
         "v": torch.randn(B, T, H, V, generator=g)}
    if gk:  # strong: uniform in [-60, -5] per step, as the accuracy case
        x["gk"] = (-5 - 55 * torch.rand(B, T, H, K, generator=g) if strong
                   else F.logsigmoid(torch.randn(B, T, H, K, generator=g)) / 4)
    if gv:
        x["gv"] = F.logsigmoid(torch.randn(B, T, H, V, generator=g)) / 4
    return x


def run_both(x, h0=None, **kw):
    """(kernel's, reference's) o, final state and every gradient, under the same upstream."""
    out = {}
    for name, fn, dt in (("kernel", fused_recurrent_gla, f32), ("ref", naive_recurrent_gla, f64)):
        xs = {n: t.detach().to(dt).requires_grad_() for n, t in x.items()}
        s0 = None if h0 is None else h0.detach().to(dt).requires_grad_()
        o, ht = fn(**xs, initial_state=s0, output_final_state=True, **kw)
        gen = torch.Generator().manual_seed(1)
        do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
        ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
        res = {"o": o, "ht": ht, **{"d" + n: t.grad for n, t in xs.items()}}
        if s0 is not None:
            res["dh0"] = s0.grad
        out[name] = res
    return out["kernel"], out["ref"]


def assert_close(got, ref, bound=1e-5):
    assert got.keys() == ref.keys()
    for name in ref:
        assert rel_error(got[name], ref[name]) < bound, (name, rel_error(got[name], ref[name]))


# T = 130: three chunks of the gates' backward; K = 20, V = 40: not powers of two, two value tiles
@pytest.mark.parametrize("gk, gv, reverse", [(True, False, False), (True, True, False),
                                              (False, True, True), (False, False, False),
                                              (True, True, True)])
def test_matches_reference(gk, gv, reverse):
    x = inputs(1, 130, 1, 20, 40, gk=gk, gv=gv)
    got, ref = run_both(x, torch.randn(1, 1, 20, 40), reverse=reverse, scale=0.5)
    assert_close(got, ref)


@pytest.mark.parametrize("reverse", [False, True])
def test_varlen_with_empty_and_one_token_sequences(reverse):
    cu = torch.tensor([0, 0, 1, 70, 70, 150])
    x = inputs(1, 150, 2, 16, 16, gv=True)
    got, ref = run_both(x, torch.randn(5, 2, 16, 16), reverse=reverse, cu_seqlens=cu)
    assert_close(got, ref)


def test_strong_gates_stay_finite_and_exact():
    """Log gates in [-60, -5] per step: every factor exp(g) in (0, 1), no overflow anywhere;
    the gates' gradient is the small difference of large terms that the anchors keep exact."""
    got, ref = run_both(inputs(1, 200, 2, 16, 16, strong=True), torch.randn(1, 2, 16, 16))
    assert all(t.isfinite().all() for t in got.values())
    assert_close(got, ref)


def test_final_state_alone_gives_an_exact_zero_gate_gradient():
    """T = 1 without an initial state: the gate multiplies a zero state, so d gk is exactly 0
    (the final state's own k v^T term is kept out of the difference that would round)."""
    x = inputs(1, 1, 1, 8, 8)
    got, ref = run_both(x)
    assert torch.equal(got["dgk"], torch.zeros_like(got["dgk"]))
    assert_close(got, ref)


def test_decoding_carries_the_state():
    """Token by token with the state carried (no gradients: one launch a token) equals the
    whole sequence at once."""
    x = inputs(1, 6, 2, 16, 32, gv=True)
    with torch.no_grad():
        o_all, s_all = fused_recurrent_gla(**x, output_final_state=True)
        s, outs = None, []
        for t in range(6):
            o, s = fused_recurrent_gla(**{n: v[:, t:t + 1] for n, v in x.items()},
                                       initial_state=s, output_final_state=True)
            outs.append(o)
    assert rel_error(torch.cat(outs, 1), o_all) < 1e-6 and rel_error(s, s_all) < 1e-6


def test_float16_within_three_times_the_reference_in_float16():
    x = inputs(1, 100, 2, 32, 32, gv=True)
    x16 = {n: t.half() for n, t in x.items()}
    with torch.no_grad():
        truth, _ = naive_recurrent_gla(**{n: t.double() for n, t in x16.items()})
        ref16, _ = naive_recurrent_gla(**x16)
        got, _ = fused_recurrent_gla(**x16)
    assert rel_error(got, truth) <= 3 * rel_error(ref16, truth)


def test_rejects_what_it_cannot_run():
    x = inputs(1, 4, 1, 300, 8)
    with pytest.raises(ValueError, match="K and V must be <= 256"):
        fused_recurrent_gla(**x)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fused_recurrent_gla(**{n: t.double() for n, t in inputs(1, 4, 1, 8, 8).items()})
