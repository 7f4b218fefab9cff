"""The references: hand-checkable properties of delta rule and GLA, and the two references of
every operator agreeing to float64 precision on cases hypothesis draws."""

import pytest
import torch
import torch.nn.functional as F

from harness.check.engine import rel_error
from harness.check.families import check_family
from references.operators import OPERATORS
from harness.registry import get
from references.delta_rule import chunk_delta_rule_ref, naive_recurrent_delta_rule
from references.gla import chunk_gla_ref, naive_recurrent_gla

f64 = torch.float64


@pytest.mark.parametrize("op", list(OPERATORS))
def test_chunk_reference_agrees_with_recurrence(op):
    # float64 end to end: the two forms differ only by reassociation (~1e-15); 1e-12 leaves
    # three orders for conditioning and is ten orders below any bug in the math.
    res = check_family("random", op, [get(op, "chunk_ref")], ["float64"], "cpu", examples=12,
                       seed=5)
    assert res.failures == [], res.failures
    worst = max(r["error"] for r in res.rows)
    assert worst < 1e-12, worst


def test_delta_rule_one_step_by_hand():
    q = torch.tensor([[[[1.0, 2.0]]]], dtype=f64)
    k = torch.tensor([[[[0.6, 0.8]]]], dtype=f64)  # unit norm
    v = torch.tensor([[[[1.0, -1.0, 2.0]]]], dtype=f64)
    beta = torch.tensor([[[0.5]]], dtype=f64)
    S0 = torch.arange(6, dtype=f64).reshape(1, 1, 2, 3)
    o, S1 = naive_recurrent_delta_rule(q, k, v, beta, scale=1.0, initial_state=S0,
                                       output_final_state=True)
    # v' = 0.5 * (v - S0^T k) = 0.5 * ([1,-1,2] - [2.4, 3.8, 5.2]) = [-0.7, -2.4, -1.6]
    v_new = torch.tensor([-0.7, -2.4, -1.6], dtype=f64)
    expect_S = S0[0, 0] + torch.outer(k[0, 0, 0], v_new)
    assert torch.allclose(S1[0, 0], expect_S, atol=1e-15)
    assert torch.allclose(o[0, 0, 0], expect_S.T @ q[0, 0, 0], atol=1e-15)


def test_delta_rule_with_beta_one_writes_v_at_k():
    # beta = 1 and a unit key: after the step, reading the state at k_t returns v_t exactly.
    T, K, V = 7, 5, 4
    k = F.normalize(torch.randn(1, T, 1, K, dtype=f64), dim=-1)
    v = torch.randn(1, T, 1, V, dtype=f64)
    for t in range(1, T + 1):
        _, S = naive_recurrent_delta_rule(k[:, :t], k[:, :t], v[:, :t], torch.ones(1, t, 1, dtype=f64),
                                          output_final_state=True)
        assert torch.allclose(S[0, 0].T @ k[0, t - 1, 0], v[0, t - 1, 0], atol=1e-12)


def test_delta_rule_per_channel_beta_is_per_channel():
    T, K, V = 9, 4, 3
    q, k = torch.randn(1, T, 2, K, dtype=f64), F.normalize(torch.randn(1, T, 2, K, dtype=f64), dim=-1)
    v, beta = torch.randn(1, T, 2, V, dtype=f64), torch.rand(1, T, 2, V, dtype=f64)
    for fn in (naive_recurrent_delta_rule, chunk_delta_rule_ref):
        o, _ = fn(q, k, v, beta)
        for c in range(V):
            o_c, _ = naive_recurrent_delta_rule(q, k, v[..., c:c + 1], beta[..., c])
            assert rel_error(o[..., c:c + 1], o_c) < 1e-13


def test_delta_rule_l2norm_matches_normalised_inputs():
    q, k = torch.randn(2, 11, 2, 6, dtype=f64), torch.randn(2, 11, 2, 6, dtype=f64)
    v, beta = torch.randn(2, 11, 2, 5, dtype=f64), torch.rand(2, 11, 2, dtype=f64)
    a, _ = naive_recurrent_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True)
    b, _ = naive_recurrent_delta_rule(q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True), v, beta)
    assert rel_error(a, b) < 1e-14


def test_gla_without_decay_is_causal_linear_attention():
    B, T, H, K, V = 2, 13, 2, 4, 5
    q, k, v = (torch.randn(B, T, H, n, dtype=f64) for n in (K, K, V))
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril() * 0.5
    expect = torch.einsum("bhts,bshv->bthv", scores, v)
    for fn in (naive_recurrent_gla, chunk_gla_ref):
        o, _ = fn(q, k, v, gk=torch.zeros(B, T, H, K, dtype=f64), scale=0.5)
        assert rel_error(o, expect) < 1e-14


def test_gla_decay_by_hand():
    # two tokens, K = V = 1: o_1 = q_1 (exp(g_1) k_0 v_0 + k_1 v_1)
    q, k, v = (torch.tensor(x, dtype=f64).reshape(1, 2, 1, 1) for x in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0]))
    g = torch.tensor([-0.5, -1.0], dtype=f64).reshape(1, 2, 1, 1)
    o, _ = naive_recurrent_gla(q, k, v, gk=g, scale=1.0)
    expect = 2.0 * (torch.exp(torch.tensor(-1.0, dtype=f64)) * 15.0 + 24.0)
    assert torch.allclose(o[0, 1, 0, 0], expect, atol=1e-13)
    # the value-side gate decays the same way from the other side
    o2, _ = naive_recurrent_gla(q, k, v, gv=g, scale=1.0)
    assert torch.allclose(o2, o, atol=1e-14)


def test_gla_reverse_is_the_flipped_recurrence():
    B, T, H, K, V = 1, 10, 2, 3, 4
    q, k, v = (torch.randn(B, T, H, n, dtype=f64) for n in (K, K, V))
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=f64))
    cu = torch.tensor([0, 4, 10])
    o, s = naive_recurrent_gla(q, k, v, g, reverse=True, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate([(0, 4), (4, 10)]):
        flip = lambda x: x[:, a:b].flip(1)  # noqa: E731
        o_n, s_n = naive_recurrent_gla(flip(q), flip(k), flip(v), flip(g), output_final_state=True)
        assert rel_error(o[:, a:b], o_n.flip(1)) < 1e-14
        assert rel_error(s[n], s_n[0]) < 1e-14


def test_gla_chunk_stays_finite_far_below_float32_range():
    # -60 per step: the cumulative gate over 64 tokens is ~-3800, exp of which is 0 in any
    # float; a chunked form that forms exp(+cumsum) gets inf * 0 = nan.
    B, T, H, K, V = 1, 130, 1, 4, 4
    q, k, v = (torch.randn(B, T, H, n) for n in (K, K, V))
    g = torch.full((B, T, H, K), -60.0)
    h0 = torch.randn(1, H, K, V)
    o, s = chunk_gla_ref(q, k, v, g, output_final_state=True, initial_state=h0)
    o_ref, s_ref = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(),
                                       output_final_state=True, initial_state=h0.double())
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    # with decay e^-60 per step each output is its own token's k v^T read by q (float32 rounding)
    assert rel_error(o, o_ref) < 1e-6
