"""The TTT-Linear and Titans references (docs/operators.md sections 3 and 4), in float64 on CPU.

The matrix (chunk / dual) forms must agree with the token-by-token forms, outputs, final
states and gradients of every input; the token-by-token forms are checked against closed forms
and against autograd's gradient of the inner loss, independently of the written-out LayerNorm
backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from references.titans import chunk_titans_linear_ref, naive_titans_linear
from references.ttt import chunk_ttt_linear_ref, naive_ttt_linear

F64 = torch.float64
TOL = 1e-12
OPS = {
    "ttt": (naive_ttt_linear, chunk_ttt_linear_ref),
    "titans": (naive_titans_linear, chunk_titans_linear_ref),
}


def make_inputs(op, B, T, H, D, N=None, initial=True, seed=0):
    """Inputs from the realistic domain of each operator (float64)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    N = B if N is None else N
    x = dict(q=randn(B, T, H, D), k=randn(B, T, H, D), v=randn(B, T, H, D),
             w=1 + 0.1 * randn(H, D), b=0.1 * randn(H, D))
    if op == "ttt":
        x["eta"] = 0.1 * torch.sigmoid(randn(B, T, H, 1))
        x["initial_state"] = 0.1 * randn(N, H, D, D) if initial else None
        x["initial_state_bias"] = 0.1 * randn(N, H, 1, D) if initial else None
    else:
        x["theta"] = 0.1 * torch.sigmoid(randn(B, T, H))
        x["alpha"] = torch.sigmoid(randn(B, T, H))
        x["eta"] = torch.sigmoid(randn(B, T, H))
        x["initial_state"] = 0.1 * randn(N, H, D, D) if initial else None
        x["initial_momentum"] = 0.1 * randn(N, H, D, D) if initial else None
    return x


def assert_close(name, x, ref, tol=TOL):
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    diff = (x - ref).abs()
    err = (diff.norm() / ref.norm()).item() if ref.norm() > 0 else diff.norm().item()
    worst = tuple(torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}; worst at {worst}"


def compare_forms(op, inputs, **kwargs):
    """Chunk form vs naive form: outputs, final states and all input gradients."""
    naive, chunk = OPS[op]
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = {**inputs, **leaves}
    ref = naive(**args, output_final_state=True, **kwargs)
    out = chunk(**args, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1234)
    ups = [torch.randn(r.shape, generator=gen, dtype=F64) for r in ref]
    for name, x, r in zip(("o", "final_state", "final_state_2"), out, ref):
        assert x.dtype == r.dtype == F64
        assert_close(f"{op} {name}", x, r)
    names = list(leaves)
    g_ref = torch.autograd.grad(ref, [leaves[n] for n in names], ups)
    g_out = torch.autograd.grad(out, [leaves[n] for n in names], ups)
    for name, x, r in zip(names, g_out, g_ref):
        assert_close(f"{op} d{name}", x, r)


CASES = {
    "T37_C16_initial_default_scale": dict(B=2, T=37, chunk_size=16, initial=True, scale=None),
    "T37_C4_no_initial_scale": dict(B=2, T=37, chunk_size=4, initial=False, scale=0.3),
    "varlen_C16_initial": dict(B=1, T=37, chunk_size=16, initial=True, scale=None,
                               cu=[0, 1, 1, 22, 37]),
    "varlen_C4_no_initial": dict(B=1, T=37, chunk_size=4, initial=False, scale=0.5,
                                 cu=[0, 17, 17, 18, 37]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op", list(OPS))
def test_chunk_matches_naive(op, case):
    c = CASES[case]
    cu = None if "cu" not in c else torch.tensor(c["cu"], dtype=torch.int64)
    N = c["B"] if cu is None else len(c["cu"]) - 1
    inputs = make_inputs(op, c["B"], c["T"], 2, 8, N=N, initial=c["initial"], seed=len(case))
    compare_forms(op, inputs, scale=c["scale"], chunk_size=c["chunk_size"], cu_seqlens=cu)


@pytest.mark.parametrize("op", list(OPS))
def test_empty_sequence_keeps_initial_state(op):
    x = make_inputs(op, 1, 5, 2, 4, N=3, seed=3)
    cu = torch.tensor([0, 0, 5, 5], dtype=torch.int64)
    for fn in OPS[op]:
        o, s1, s2 = fn(**x, output_final_state=True, cu_seqlens=cu)
        assert o.shape == (1, 5, 2, 4)
        s2_init = x["initial_state_bias" if op == "ttt" else "initial_momentum"]
        for n in (0, 2):
            assert torch.equal(s1[n], x["initial_state"][n]) and torch.equal(s2[n], s2_init[n])


@pytest.mark.parametrize("op", list(OPS))
def test_padding_invariance(op):
    """A sequence of 20 tokens (chunk_size 16) gives the same outputs with 9 more tokens after
    it, and the same final state as its own run when packed with another sequence."""
    x = make_inputs(op, 1, 29, 2, 8, seed=5)
    first = {n: (t[:, :20] if t is not None and t.dim() >= 3 and n not in ("initial_state",
             "initial_state_bias", "initial_momentum") else t) for n, t in x.items()}
    states = [n for n in x if n.startswith("initial")]
    packed = dict(x, **{n: torch.cat([x[n], 0.1 * torch.ones_like(x[n])]) for n in states})
    cu = torch.tensor([0, 20, 29], dtype=torch.int64)
    for fn in OPS[op]:
        o20, *s20 = fn(**first, output_final_state=True)
        o29, *_ = fn(**x)
        o_packed, *s_packed = fn(**packed, output_final_state=True, cu_seqlens=cu)
        assert_close(f"{op} o (padded)", o29[:, :20], o20)
        assert_close(f"{op} o (packed)", o_packed[:, :20], o20)
        for s, r in zip(s_packed, s20):
            assert_close(f"{op} final state (packed)", s[:1], r)


def test_ttt_eta_zero_is_closed_form():
    """With eta = 0 the weights never move: o = u + w * LN(u) + b, u = scale q W0 + hb0."""
    x = make_inputs("ttt", 2, 19, 2, 8, seed=7)
    x["eta"] = torch.zeros_like(x["eta"])
    W0, hb0 = x["initial_state"], x["initial_state_bias"]
    u = 0.7 * torch.einsum("bthk,bhkd->bthd", x["q"], W0) + hb0[:, None, :, 0]
    expected = u + x["w"] * F.layer_norm(u, (8,), eps=1e-6) + x["b"]
    for fn in OPS["ttt"]:
        o, W, hb = fn(**x, scale=0.7, chunk_size=4, output_final_state=True)
        assert_close("ttt o (eta=0)", o, expected)
        assert torch.equal(W, W0) and torch.equal(hb, hb0)
    compare_forms("ttt", x, chunk_size=4)


def test_ttt_one_minibatch_against_autograd():
    """One mini-batch: W_i = W0 - eta_i * d(sum_{j<=i} loss_j)/dW at W0 (autograd, F.layer_norm)."""
    x = make_inputs("ttt", 1, 5, 1, 4, seed=11)
    W0, hb0 = x["initial_state"][0, 0], x["initial_state_bias"][0, 0, 0]
    q, k, v, eta = (x[n][0, :, 0] for n in ("q", "k", "v", "eta"))
    w, b = x["w"][0], x["b"][0]
    W, hb = W0.clone().requires_grad_(), hb0.clone().requires_grad_()
    losses = 0.5 * ((w * F.layer_norm(k @ W + hb, (4,), eps=1e-6) + b - (v - k)) ** 2).sum(-1)
    expected = []
    for i in range(5):
        dW, dhb = torch.autograd.grad(losses[: i + 1].sum(), (W, hb), retain_graph=True)
        u = 0.5 * q[i] @ (W0 - eta[i] * dW) + hb0 - eta[i] * dhb
        expected.append(u + w * F.layer_norm(u, (4,), eps=1e-6) + b)
    for fn in OPS["ttt"]:
        o, W5, hb5 = fn(**x, scale=0.5, chunk_size=5, output_final_state=True)
        assert_close("ttt o (autograd)", o[0, :, 0], torch.stack(expected))
        assert_close("ttt W (autograd)", W5[0, 0], W0 - eta[4] * dW)


def test_titans_momentum_only_is_closed_form():
    """theta = 0, alpha = 0, eta = 1: S stays S0 and M_t = M0 + (t + 1) S0 (t = 0, 1, ...)."""
    x = make_inputs("titans", 2, 19, 2, 8, seed=13)
    x.update(theta=torch.zeros_like(x["theta"]), alpha=torch.zeros_like(x["alpha"]),
             eta=torch.ones_like(x["eta"]))
    M0, S0 = x["initial_state"], x["initial_momentum"]
    steps = torch.arange(1, 20, dtype=F64)[None, :, None, None, None]
    M = M0[:, None] + steps * S0[:, None]  # [B, T, H, D, D]
    u = 0.3 * torch.einsum("bthk,bthkd->bthd", x["q"], M)
    expected = u + x["w"] * F.layer_norm(u, (8,), eps=1e-6) + x["b"]
    for fn in OPS["titans"]:
        o, M_T, S_T = fn(**x, scale=0.3, chunk_size=4, output_final_state=True)
        assert_close("titans o (momentum only)", o, expected)
        assert_close("titans M_T", M_T, M0 + 19 * S0)
        assert torch.equal(S_T, S0)
    # zero momentum: M stays M0
    x["initial_momentum"] = torch.zeros_like(S0)
    for fn in OPS["titans"]:
        _, M_T, S_T = fn(**x, chunk_size=4, output_final_state=True)
        assert torch.equal(M_T, M0) and not S_T.any()


def test_titans_one_minibatch_against_autograd():
    """grad_t = d l_t / dM at M0 (autograd, F.layer_norm, no 0.5), then the plain recurrence."""
    x = make_inputs("titans", 1, 6, 1, 4, seed=17)
    M0, S0 = x["initial_state"][0, 0], x["initial_momentum"][0, 0]
    q, k, v, theta, alpha, eta = (x[n][0, :, 0] for n in ("q", "k", "v", "theta", "alpha", "eta"))
    w, b = x["w"][0], x["b"][0]
    Mg = M0.clone().requires_grad_()
    losses = ((w * F.layer_norm(k @ Mg, (4,), eps=1e-6) + b - (v - k)) ** 2).sum(-1)
    M, S, expected = M0, S0, []
    for t in range(6):
        (grad,) = torch.autograd.grad(losses[t], Mg, retain_graph=True)
        S = eta[t] * S - theta[t] * grad
        M = (1 - alpha[t]) * M + S
        u = 0.5 * q[t] @ M
        expected.append(u + w * F.layer_norm(u, (4,), eps=1e-6) + b)
    for fn in OPS["titans"]:
        o, M6, S6 = fn(**x, scale=0.5, chunk_size=6, output_final_state=True)
        assert_close("titans o (autograd)", o[0, :, 0], torch.stack(expected))
        assert_close("titans M (autograd)", M6[0, 0], M)
        assert_close("titans S (autograd)", S6[0, 0], S)


@pytest.mark.parametrize("pattern", ["some", "all"])
def test_titans_exact_zero_factors(pattern):
    """alpha = 1 and eta = 0 exactly (factors of exactly 0): finite gradients that agree."""
    x = make_inputs("titans", 2, 23, 2, 8, seed=19)
    alpha, eta = x["alpha"].clone(), x["eta"].clone()
    if pattern == "some":
        alpha[:, ::3] = 1.0
        eta[:, 1::4] = 0.0
    else:
        alpha.fill_(1.0)
        eta.fill_(0.0)
    x.update(alpha=alpha, eta=eta)
    compare_forms("titans", x, chunk_size=8)
