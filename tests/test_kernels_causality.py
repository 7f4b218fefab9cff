"""A NaN or inf at token t reaches no output before t, nor another sequence (docs/check.md, the
causality family), in the kernels whose dense products inside a chunk would otherwise carry it
back: a masked-out future entry times 0 is NaN when the entry is NaN.

Each case plants one non-finite value in every channel and head of one token and compares
exactly: the outputs before it (and all of the other sequence, final state included) with the
same kernel's on the clean inputs, bit for bit; from it on, which outputs are finite with the
float64 recurrence on the same planted inputs. Tokens 3 and 40 sit in different 16-row blocks
of the WY transform's first chunk, 66 in the second chunk (T = 70, chunks of 64)."""

import pytest
import torch
import torch.nn.functional as F

import kernels.delta_rule.chunk as chunk_module
from kernels.delta_rule import chunk_delta_rule
from kernels.delta_rule.parallel import parallel_delta_rule
from references.delta_rule import naive_recurrent_delta_rule

PLANTS = [("k", 3, "nan"), ("v", 40, "inf"), ("beta", 66, "nan"), ("q", 20, "-inf"),
          ("k", 66, "-inf"), ("v", 3, "nan"), ("beta", 40, "inf")]


def inputs(T=70, H=2, K=16, V=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, T, H, K, generator=g), torch.randn(1, T, H, K, generator=g)
    return {"q": q, "k": F.normalize(k, dim=-1), "v": torch.randn(1, T, H, V, generator=g),
            "beta": torch.rand(1, T, H, generator=g)}


def planted(x, name, t, value):
    y = dict(x)
    y[name] = x[name].clone()
    y[name][0, t] = float(value)
    return y


# FUSED_OUTPUT (off by default) shares the WY stage: its own output products on three plants
@pytest.mark.parametrize("fused_output, name, t, value",
                         [(False, *p) for p in PLANTS] + [(True, *p) for p in PLANTS[:3]])
def test_chunk_keeps_a_non_finite_token_in_its_future(monkeypatch, fused_output, name, t, value):
    monkeypatch.setattr(chunk_module, "FUSED_OUTPUT", fused_output)
    cu = torch.tensor([0, 30, 70])  # the planted token's sequence, and another one before it
    seq0 = t < 30
    x = inputs()
    h0 = torch.randn(2, 2, 16, 16)
    kw = {"initial_state": h0, "output_final_state": True, "cu_seqlens": cu}
    with torch.no_grad():
        o_c, s_c = chunk_delta_rule(**x, **kw)
        o_d, s_d = chunk_delta_rule(**planted(x, name, t, value), **kw)
        x64 = {n: v.double() for n, v in planted(x, name, t, value).items()}
        o_r, s_r = naive_recurrent_delta_rule(**x64, initial_state=h0.double(),
                                              output_final_state=True, cu_seqlens=cu)
    other = slice(30, 70) if seq0 else slice(0, 30)
    assert torch.equal(o_d[:, other], o_c[:, other])
    assert torch.equal(s_d[1 if seq0 else 0], s_c[1 if seq0 else 0])
    start = 0 if seq0 else 30
    assert torch.equal(o_d[:, start:t], o_c[:, start:t])
    end = 30 if seq0 else 70
    assert torch.equal(o_d[:, t:end].isfinite(), o_r[:, t:end].isfinite())
    assert not o_d[:, t].isfinite().any()  # every channel of the planted token
    assert torch.equal(s_d.isfinite(), s_r.isfinite())


@pytest.mark.parametrize("name, t, value", PLANTS)
def test_parallel_keeps_a_non_finite_token_in_its_future(name, t, value):
    x = inputs()
    with torch.no_grad():
        o_c, a_c = parallel_delta_rule(**x, output_attentions=True)
        o_d, a_d = parallel_delta_rule(**planted(x, name, t, value), output_attentions=True)
        x64 = {n: v.double() for n, v in planted(x, name, t, value).items()}
        o_r, _ = naive_recurrent_delta_rule(**x64)
    assert torch.equal(o_d[:, :t], o_c[:, :t])
    assert torch.equal(a_d[:, :, :t], a_c[:, :, :t])
    assert torch.equal(o_d[:, t:].isfinite(), o_r[:, t:].isfinite())
    if name in ("k", "beta"):  # A = d o / d v depends on k and beta, not on v
        assert not a_d[:, :, t, :t + 1].isfinite().any()


def test_switched_off_the_same_results_and_the_leak_again(monkeypatch):
    """utils.NONFINITE_SAFE = False (the stages as before the fix, for speed): finite inputs give
    bitwise what they give switched on, and a NaN in v at token 40 reaches token 0 again."""
    import kernels.common.utils as utils

    x = inputs()
    with torch.no_grad():
        on = chunk_delta_rule(**x, output_final_state=True)
        monkeypatch.setattr(utils, "NONFINITE_SAFE", False)
        off = chunk_delta_rule(**x, output_final_state=True)
        leaky, _ = chunk_delta_rule(**planted(x, "v", 40, "nan"))
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    assert not leaky[:, 0].isfinite().all()
