"""chunk_titans_linear's product modes through the interpreter (kernels/titans/chunk.py's
WALK_MIXED, UPDATE_MIXED, TRAINING_WALK_MIXED, BACKWARD_WALK_MIXED, OUTPUT_MIXED and
WALK_ACCUMULATE): float16 q, k, v against the float64 reference and against float32 operands,
each switch taking what it names and nothing else, and a mode no kernel knows refused."""

import pytest
import torch

from harness.check.engine import rel_error
from kernels.titans import chunk, chunk_titans_linear
from references.titans import naive_titans_linear

import walk_grads  # tests/walk_grads.py
from test_kernels_titans import NAMES, both, grads, inputs


@pytest.mark.parametrize("mode,state_bound", [(None, 1e-5), ("round", 1e-3), ("split", 1e-5),
                                              ("tf32", 1e-5), ("tf32x2", 1e-5),
                                              ({"float16": "split"}, 1e-5)])
def test_float16_within_its_rounding(monkeypatch, mode, state_bound):
    """float16 q, k, v (the rest float32): o within 1e-3 of float64 on the same rounded inputs
    (float16's unit roundoff is 4.9e-4, o is stored in float16; measured 2e-4). The final states
    are float32: within 1e-5 when the walk's products take the state in float32
    (chunk.WALK_MIXED None, measured 1.7e-7) or split it in two float16 halves ("split", ~22
    bits kept, also given per dtype: 5e-7 to 9e-7), within 1e-3 when they round it to float16
    ("round": one rounding of 4.9e-4 a product, measured 2.2e-4). The interpreter takes TF32
    products exactly, so "tf32" and "tf32x2" are checked for their arithmetic here and for
    their rounding on a GPU (harness check). The outputs' products of Q's float16 rows
    (OUTPUT_MIXED "tf32x2", the scale applied after) with every mode: o within the same 1e-3
    (measured 2e-4; 1.26 with Q M0 left unscaled). Without a backward float16 takes the replay
    (chunk.REPLAY), whose walk keeps its states unscaled under "round" and "split" (scaled
    tiles rounded to float16 put o, M and S at inf)."""
    monkeypatch.setattr(chunk, "WALK_MIXED", mode)
    monkeypatch.setattr(chunk, "UPDATE_MIXED", None)  # the updates as WALK_MIXED's
    monkeypatch.setattr(chunk, "OUTPUT_MIXED", "tf32x2")
    monkeypatch.setattr(chunk, "REPLAY", {"float16": 8})
    x, st, cu = inputs(1, 70, 2, 16)
    got, ref = both(x, st, cu, dtype=torch.float16)
    assert got[0].dtype == torch.float16
    assert rel_error(got[0], ref[0]) < 1e-3
    assert rel_error(got[1], ref[1]) < state_bound and rel_error(got[2], ref[2]) < state_bound


def state_grads(fn, x, st):
    """Every gradient of <final M, dM> + <final S, dS> alone (fixed random dM, dS): no dO, whose
    rounding to the inputs' dtype would hide the walks' own."""
    x = {n: t.clone().requires_grad_() for n, t in x.items()}
    st = {n: t.clone().requires_grad_() for n, t in st.items()}
    _, M, S = fn(*(x[n] for n in NAMES), **st, chunk_size=16, output_final_state=True)
    g = torch.Generator().manual_seed(5)
    dM, dS = (torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype) for y in (M, S))
    ((M * dM).sum() + (S * dS).sum()).backward()
    return {n: t.grad for n, t in {**x, **st}.items() if t.grad is not None}


def test_update_products_apart_from_z(monkeypatch):
    """chunk.UPDATE_MIXED takes the walks' update products (the forward's K^T (c o G), the split
    backward walk's Q~^T (f0 o dU), K^T dZ, Q~^T (p0 o dU)) apart from Z = K M0 and K dM', K dS'
    (WALK_MIXED, None here: float32 operands). float16 q, k, v through the interpreter, the
    updates under "round" (their float32 operand rounded to float16, 4.9e-4, once a product):
    the final states within 1e-3 of float64 but not within 1e-5 (measured 1.4e-4 and 1.9e-4;
    2e-7 with float32 updates), so the forward walk rounds them; the gradient of the initial
    memory through the final states alone within 1e-3 but not within 5e-5 (measured 2.0e-4;
    3.3e-7 with float32 updates, 1.6e-5 with the backward walk's left float32), so the
    backward walk rounds its own; every other such gradient within 1e-3."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    monkeypatch.setattr(chunk, "WALK_MIXED", None)
    monkeypatch.setattr(chunk, "UPDATE_MIXED", {"float16": "round"})
    x, st, cu = inputs(1, 40, 2, 16)
    with torch.no_grad():
        got, ref = both(x, st, cu, dtype=torch.float16)
    for a, r in zip(got[1:], ref[1:]):
        assert 1e-5 < rel_error(a, r) < 1e-3, rel_error(a, r)
    half = {n: (t.half() if n in "qkv" else t) for n, t in x.items()}
    got = state_grads(chunk_titans_linear, half, st)
    ref = state_grads(naive_titans_linear, {n: t.double() for n, t in half.items()},
                      {n: s.double() for n, s in st.items()})
    assert set(ref) <= set(got)  # q's is the kernel's zero: the states do not take Q
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-3, (name, rel_error(got[name], ref[name]))
    assert rel_error(got["initial_state"], ref["initial_state"]) > 5e-5


@pytest.mark.parametrize("switch", ["TRAINING_WALK_MIXED", "BACKWARD_WALK_MIXED"])
def test_walk_products_of_a_call_with_a_backward(monkeypatch, switch):
    """chunk.TRAINING_WALK_MIXED takes the forward walk's Z in a call with a backward apart from
    a call without one (WALK_MIXED, None here: float32 operands), chunk.BACKWARD_WALK_MIXED the
    split backward walk's K dM', K dS'. float16 q, k, v, the switch's products under "round"
    (the state rounded to float16 once a product): a call without a backward is bit for bit
    WALK_MIXED's; with one, BACKWARD_WALK_MIXED leaves o and dq (final in the backward's first
    kernel) bit for bit and moves every other gradient, TRAINING_WALK_MIXED moves o and every
    gradient (through its BACKWARD_WALK_MIXED None: the backward walk as the forward); all
    within 1e-3 of float64 (measured 1.9e-4 to 4.8e-4). Either switch ignored fails it."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    monkeypatch.setattr(chunk, "WALK_MIXED", None)
    monkeypatch.setattr(chunk, "UPDATE_MIXED", None)
    monkeypatch.setattr(chunk, "TRAINING_WALK_MIXED", None)
    monkeypatch.setattr(chunk, "BACKWARD_WALK_MIXED", None)
    x, st, cu = inputs(1, 40, 2, 16)
    half = {n: (t.half() if n in "qkv" else t) for n, t in x.items()}
    with torch.no_grad():
        plain = both(half, st, cu)[0]
    base = grads_and_o(half, st, cu)
    monkeypatch.setattr(chunk, switch, {"float16": "round"})
    with torch.no_grad():
        for a, p in zip(both(half, st, cu)[0], plain):
            assert torch.equal(a, p)
    got = grads_and_o(half, st, cu)
    ref = grads(naive_titans_linear, {n: t.double() for n, t in half.items()},
                {n: s.double() for n, s in st.items()}, cu, 16, None)
    ref["o"] = naive_titans_linear(*(half[n].double() for n in NAMES),
                                   **{n: s.double() for n, s in st.items()}, chunk_size=16)[0]
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-3, (name, rel_error(got[name], ref[name]))
        kept = switch == "BACKWARD_WALK_MIXED" and name in ("o", "q")
        assert torch.equal(got[name], base[name]) == kept, name


def test_split3_reaches_both_walks(monkeypatch):
    """TRAINING_WALK_MIXED and BACKWARD_WALK_MIXED "split3" (float16 q, k, v: the state as three
    float16 parts) against float32 operands (every switch None), a call with a backward: every
    gradient and o within 1e-4 (o and dq, dk, dv are float16: a rounding flipped by the last
    bits is one float16 step, measured <= 1.1e-5), and some float32 gradient moved (the three
    products sum in another order; split3 ignored, nothing does). That the parts hold the state
    whole is test_kernels_common.py's."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    for name in ("WALK_MIXED", "UPDATE_MIXED", "TRAINING_WALK_MIXED", "BACKWARD_WALK_MIXED"):
        monkeypatch.setattr(chunk, name, None)
    x, st, cu = inputs(1, 40, 2, 16)
    half = {n: (t.half() if n in "qkv" else t) for n, t in x.items()}
    base = grads_and_o(half, st, cu)
    for name in ("TRAINING_WALK_MIXED", "BACKWARD_WALK_MIXED"):
        monkeypatch.setattr(chunk, name, {"float16": "split3"})
    got = grads_and_o(half, st, cu)
    errors = {name: rel_error(got[name], base[name]) for name in base}
    assert max(errors.values()) < 1e-4, errors
    assert max(errors[name] for name in errors if got[name].dtype == torch.float32) > 0


class _NoLaunch:
    """A kernel that fails the test if launched."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel launched before the switches were read")


@pytest.mark.parametrize("switch", ["WALK_MIXED", "UPDATE_MIXED", "TRAINING_WALK_MIXED",
                                    "BACKWARD_WALK_MIXED", "OUTPUT_MIXED"])
def test_a_product_mode_not_known_is_an_error(monkeypatch, switch):
    """A product mode no kernel knows is a ValueError naming the switch and the mode, raised
    before any of the forward's kernels launches (the kernels' last branch would take it as
    another mode); the training switches in a call with a backward, the rest in one without."""
    monkeypatch.setattr(chunk, switch, {"float16": "split4"})
    for name in dir(chunk):
        if name.startswith("chunk_titans_linear_") and name.endswith("_kernel"):
            monkeypatch.setattr(chunk, name, _NoLaunch())
    x, st, cu = inputs(1, 20, 1, 16)
    grad = switch in ("TRAINING_WALK_MIXED", "BACKWARD_WALK_MIXED")
    half = {n: (t.half() if n in "qkv" else t).requires_grad_(grad) for n, t in x.items()}
    with pytest.raises(ValueError, match=f"{switch} must name .*'split4'"):
        chunk_titans_linear(*(half[n] for n in NAMES), chunk_size=16)


def grads_and_o(x, st, cu):
    """The kernel's gradients (as ``grads``) and its o."""
    return walk_grads.grads_and_o(chunk_titans_linear, NAMES, x, st, cu, 16)


@pytest.mark.parametrize("mode", ["tf32", "tf32x2"])
def test_accumulated_updates_in_the_tf32_modes(monkeypatch, mode):
    """chunk.WALK_ACCUMULATE under the update modes bfloat16 and the widest tiles take
    (minibatch.dot_state_into's "tf32" and "tf32x2" forms), float16 q, k, v through the
    interpreter: o and both final states as the updates formed apart give them, within 1e-6
    (the same values in "tf32"; "tf32x2" adds its two products to the rest one at a time,
    measured <= 1.3e-7 apart), the final states within 1e-5 of float64 (measured 2.2e-7) and o
    within float16's rounding (1e-3; measured 2.1e-4)."""
    monkeypatch.setattr(chunk, "UPDATE_MIXED", {"float16": mode})
    monkeypatch.setattr(chunk, "WALK_ACCUMULATE", False)
    x, st, cu = inputs(1, 40, 2, 16)
    with torch.no_grad():
        apart, ref = both(x, st, cu, dtype=torch.float16)
        monkeypatch.setattr(chunk, "WALK_ACCUMULATE", True)
        got, _ = both(x, st, cu, dtype=torch.float16)
    for a, b, r, bound in zip(got, apart, ref, (1e-3, 1e-5, 1e-5)):
        assert rel_error(a, b) < 1e-6, rel_error(a, b)
        assert rel_error(a, r) < bound, rel_error(a, r)
