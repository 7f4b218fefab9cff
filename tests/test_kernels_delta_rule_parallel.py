"""The parallel delta-rule kernel (output and attention matrix) against the float64 reference,
through the Triton interpreter (conftest sets TRITON_INTERPRET=1).

Tolerances. float32: every product is float32 with exact ("ieee") dots; per chunk step the
sweep chains G K^T and G -= M W (W, U from the chunked form's WY stage, itself ~1e-7), and G is
carried through chunk transitions P_j, each a product of (I - beta k k^T) factors of norm <= 1,
so errors do not grow along the sweep: outputs and A land at ~2e-7 relative (measured 8e-8 at
T = 1 to 3e-7 at K = 200). 1e-5 leaves 30x of room and still catches any wrong or missing term
(a dropped mask, beta or sign of the G update costs 1e-2 or more). The near-parallel-keys case
gets 1e-4: there Ai has O(1) entries of alternating sign and G loses most of its norm to
cancellation in G -= M W, which costs a few more roundings (measured 9e-7).
float16: M is rounded to float16 for o += M U (as the chunked output stage rounds
tril(Q K^T)), so o lands at ~2x the float16 reference's error (measured 4.5e-4 against
2.1e-4); the test allows 3x plus half an ulp (the check's rule), and A (from the unrounded M)
one float16 ulp.
"""

import pytest
import torch
import torch.nn.functional as F

from harness.check.poison import poison_allocations
from kernels.delta_rule.parallel import parallel_delta_rule
from references.delta_rule import naive_recurrent_delta_rule

F32_TOL = 1e-5
ILL_TOL = 1e-4
F16_FACTOR, F16_FLOOR = 3.0, 1e-3


def rel(x, ref):
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm()).item()


def worst(x, ref):
    """The index of the largest absolute error, for failure messages."""
    d = (x.double() - ref.double()).abs()
    return tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape))


def make_inputs(B, T, H, K, V, seed=0):
    """Unit-norm queries and keys, sigmoid betas."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g))
    return q, k, v, beta


def reference(q, k, v, beta, scale):
    return naive_recurrent_delta_rule(q.double(), k.double(), v.double(), beta.double(), scale)[0]


def reference_attention(q, k, beta, scale):
    """A [B, H, T, T] from the float64 reference: o is linear in v, so with v_s = e_s (V = T
    one-hot values) o_t[s] = sum_r A[t, r] v_r[s] = A[t, s], i.e. the Jacobian d o_t / d v_s."""
    B, T, H, _ = k.shape
    onehot = torch.eye(T, dtype=torch.float64)[None, :, None, :].expand(B, T, H, T)
    return reference(q, k, onehot, beta, scale).permute(0, 2, 1, 3)


CASES = {
    # name: (B, T, H, K, V, scale)
    "T1": (1, 1, 1, 16, 16, None),
    "T37_one_partial_chunk": (2, 37, 1, 16, 16, 0.5),
    "T100_two_chunks_K20_V12": (1, 100, 2, 20, 12, None),
    "T100_two_chunks_B2H2": (2, 100, 2, 16, 16, 0.5),
    "T130_three_chunks": (2, 130, 2, 16, 16, None),
    "T130_three_chunks_K20_V12": (1, 130, 1, 20, 12, 0.5),
    "T70_V160_two_value_tiles": (1, 70, 1, 16, 160, None),  # V > BV_MAX: the sweep per tile
    "T70_K200": (1, 70, 1, 200, 24, 0.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_output_and_attention_match_reference(name):
    B, T, H, K, V, scale = CASES[name]
    q, k, v, beta = make_inputs(B, T, H, K, V)
    truth = reference(q, k, v, beta, scale)
    with poison_allocations():
        o, attn = parallel_delta_rule(q, k, v, beta, scale, output_attentions=True)
        o_only, none = parallel_delta_rule(q, k, v, beta, scale)
    assert none is None and o.dtype == attn.dtype == torch.float32
    assert attn.shape == (B, H, T, T)
    assert rel(o, truth) < F32_TOL, (rel(o, truth), worst(o, truth))
    assert torch.equal(o_only, o)
    # o = A v per (b, h), and the upper triangle is written as exact zeros
    assert torch.isfinite(attn).all()
    assert torch.equal(attn.triu(1), torch.zeros_like(attn))
    av = torch.einsum("bhts,bshv->bthv", attn.double(), v.double())
    assert rel(av, truth) < F32_TOL, (rel(av, truth), worst(av, truth))


@pytest.mark.parametrize("T,K,V,scale", [(7, 4, 4, None), (9, 4, 4, 0.5), (70, 20, 12, 0.5)])
def test_attention_is_the_jacobian_of_the_reference(T, K, V, scale):
    q, k, v, beta = make_inputs(2, T, 2, K, V, seed=T)
    with poison_allocations():
        _, attn = parallel_delta_rule(q, k, v, beta, scale, output_attentions=True)
    truth = reference_attention(q, k, beta, scale)
    assert rel(attn, truth) < F32_TOL, (rel(attn, truth), worst(attn, truth))


def test_attention_jacobian_by_autograd_on_a_tiny_case():
    q, k, v, beta = make_inputs(1, 6, 1, 4, 4, seed=3)
    jac = torch.autograd.functional.jacobian(
        lambda x: reference(q, k, x, beta, None)[0, :, 0, 0], v.double())  # d o_t[0] / d v
    truth = jac[:, 0, :, 0, 0]  # [T, T]: d o_t[0] / d v_s[0] = A[t, s]
    _, attn = parallel_delta_rule(q, k, v, beta, output_attentions=True)
    assert rel(attn[0, 0], truth) < F32_TOL


def test_beta_near_one_with_nearly_parallel_keys_stays_accurate():
    B, T, H, K, V = 1, 100, 2, 16, 16
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 1, H, K, generator=g)
    k = F.normalize(base + 1e-3 * torch.randn(B, T, H, K, generator=g), dim=-1)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = 1 - 1e-3 * torch.rand(B, T, H, generator=g)
    o, attn = parallel_delta_rule(q, k, v, beta, output_attentions=True)
    assert torch.isfinite(o).all() and torch.isfinite(attn).all()
    truth_o, truth_a = reference(q, k, v, beta, None), reference_attention(q, k, beta, None)
    assert rel(o, truth_o) < ILL_TOL, (rel(o, truth_o), worst(o, truth_o))
    assert rel(attn, truth_a) < ILL_TOL, (rel(attn, truth_a), worst(attn, truth_a))


def test_float16_within_factor_of_same_dtype_reference():
    q, k, v, beta = (x.half() for x in make_inputs(1, 70, 2, 16, 16))
    truth = reference(q, k, v, beta, None)
    same = naive_recurrent_delta_rule(q, k, v, beta)[0]  # float16 inputs, float32 state
    o, attn = parallel_delta_rule(q, k, v, beta, output_attentions=True)
    assert o.dtype == attn.dtype == torch.float16
    assert rel(o, truth) <= F16_FACTOR * rel(same, truth) + F16_FLOOR
    truth_a = reference_attention(q, k, beta, None)
    assert rel(attn, truth_a) <= F16_FLOOR


def test_empty_sequence():
    q, k, v, beta = make_inputs(2, 0, 1, 16, 16)
    o, attn = parallel_delta_rule(q, k, v, beta, output_attentions=True)
    assert o.shape == (2, 0, 1, 16) and attn.shape == (2, 1, 0, 0)


def test_rejects_what_it_does_not_support():
    q, k, v, beta = make_inputs(1, 4, 1, 8, 8)
    with pytest.raises(ValueError, match="beta.*per token"):
        parallel_delta_rule(q, k, v, beta[..., None].expand(1, 4, 1, 8))
    big = torch.zeros(1, 1, 1, 300)
    with pytest.raises(ValueError, match="K=300"):
        parallel_delta_rule(big, big, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1))
    with pytest.raises(TypeError, match="float64"):
        parallel_delta_rule(*(x.double() for x in (q, k, v, beta)))
    with pytest.raises(TypeError, match="output_attentions"):
        parallel_delta_rule(q, k, v, beta, output_attentions=1)
    with pytest.raises(NotImplementedError, match="chunk_delta_rule"):
        parallel_delta_rule(q, k, v.requires_grad_(), beta)
    with torch.no_grad():  # inference with leaves that require grad is fine
        o, _ = parallel_delta_rule(q, k, v, beta)
    assert rel(o, reference(q, k, v.detach(), beta, None)) < F32_TOL
