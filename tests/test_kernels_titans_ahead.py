"""chunk.WALK_AHEAD through the interpreter: the forward walk that forms each mini-batch's
Z = K M0 as m (K N - (K K'^T) (cM' o G')), from the state before the last mini-batch's update
and that update's rows (kernels/titans/walk.py, ahead_step), against the float64 reference and
the walk that updates the state first.

Bound 1e-5 against float64 as tests/test_kernels_titans.py's (float32 products exact,
measured <= 3e-7), and 2e-6 against the default walk: the two sum the same terms in another
order (measured <= 3.8e-7). Broken once each: the correction left out (Z = m K N) fails all
14 cases (o 0.73 off in the first); the pending update not applied to the final states fails
10 (0.45); the states stored before their update fail the 10 that store them (o 0.11).
"""

import pytest
import torch

from harness.check.engine import rel_error
from kernels.titans import chunk, chunk_titans_linear
from references.titans import naive_titans_linear

from test_kernels_titans import both, check, grads, inputs, zero_and_fast_gates


def forward(monkeypatch, x, st, cu, ahead, dtype=torch.float32):
    monkeypatch.setattr(chunk, "WALK_AHEAD", ahead)
    with torch.no_grad():
        return both(x, st, cu, 16, dtype)


@pytest.mark.parametrize("T,cu,gates,every", [
    (70, None, None, None), (57, [0, 21, 21, 22, 57], None, None), (70, None, "zero", None),
    (70, None, None, 2), (57, [0, 21, 21, 22, 57], None, 2), (70, None, "zero", 2),
    (70, None, "fast", 2), (140, None, "fast", 8)])
def test_forward(monkeypatch, T, cu, gates, every):
    """Without a backward, on the walk's own products (REPLAY None: WALK_PRODUCTS) and on the
    replay (REPLAY 2 and 8: the states as scales times tiles, stored once per segment): T = 70
    (a partial last mini-batch), sequences of 21, 0, 1 and 35 tokens, zero factors, and factors
    that take a scale under its floor (zero_and_fast_gates)."""
    x, st, cu = inputs(1, T, 2, 16, cu=cu)
    if gates:
        x = zero_and_fast_gates(x, gates == "fast")
    monkeypatch.setattr(chunk, "REPLAY", every)
    default, _ = forward(monkeypatch, x, st, cu, False)
    got, ref = forward(monkeypatch, x, st, cu, True)
    check(got, ref, 1e-5)
    for name, a, d in zip(("o", "final state", "final momentum"), got, default):
        assert rel_error(a, d) < 2e-6, (name, rel_error(a, d))


@pytest.mark.parametrize("every", [None, 8])
def test_float16(monkeypatch, every):
    """float16 q, k, v, on the walk's products and on the replay: o within float16's rounding
    of float64 (2e-4 either walk) and within 2e-5 of the default walk's (a few of its float16
    roundings fall the other way: 2.8e-6), the final states as in float32."""
    x, st, _ = inputs(1, 160, 1, 16)
    monkeypatch.setattr(chunk, "REPLAY", {"float16": every} if every else None)
    default, _ = forward(monkeypatch, x, st, None, False, torch.float16)
    got, ref = forward(monkeypatch, x, st, None, True, torch.float16)
    assert rel_error(got[0], ref[0]) < 1e-3, rel_error(got[0], ref[0])
    check(got[1:], ref[1:], 1e-5)
    for bound, a, d in zip((2e-5, 2e-6, 2e-6), got, default):
        assert rel_error(a, d) < bound, rel_error(a, d)


@pytest.mark.parametrize("cu,gates,half", [
    (None, None, None), ([0, 21, 21, 22, 57], None, None), (None, "zero", None),
    (None, None, "float16")])
def test_gradients(monkeypatch, cu, gates, half):
    """With a backward the walk stores every mini-batch's M0, S0 after its pending update (and,
    under HALF_STATES_BACKWARD "float16", float16 q, k, v, its Z): every gradient within 1e-5 of
    float64 (2e-3 in float16, whose rounding of q, k, v and the gradients dominates: measured
    <= 6.3e-4) and within
    2e-6 of the default walk's (measured <= 3.8e-7; 2e-5 in float16, whose gradients' rounding
    falls the other way here and there: <= 4.5e-6)."""
    x, st, cu = inputs(1, 57, 2, 16, cu=cu)
    if gates:
        x = zero_and_fast_gates(x, False)
    if half:
        x = {n: t.half() if n in "qkv" else t for n, t in x.items()}
    monkeypatch.setattr(chunk, "HALF_STATES_BACKWARD", {"float16": half} if half else None)
    monkeypatch.setattr(chunk, "WALK_AHEAD", False)
    default = grads(chunk_titans_linear, x, st, cu, 16, None)
    monkeypatch.setattr(chunk, "WALK_AHEAD", True)
    got = grads(chunk_titans_linear, x, st, cu, 16, None)
    ref = grads(naive_titans_linear, x, st, cu, 16, torch.float64)
    bound, near = (2e-3, 2e-5) if half else (1e-5, 2e-6)
    for name in ref:
        assert rel_error(got[name], ref[name]) < bound, (name, rel_error(got[name], ref[name]))
        assert rel_error(got[name], default[name]) < near, (name, rel_error(got[name],
                                                                             default[name]))
