"""chunk.HALF_STATES_BACKWARD through the interpreter: the states a call with a backward stores
per mini-batch in float16, rows scaled by powers of two, with each mini-batch's Z = K M0 stored
beside them, from which the outputs kernel and the backward form G instead of from the rounded
M0, against the float64 reference and the float32 states' form."""

import pytest

from harness.check.engine import rel_error
from kernels.titans import chunk, chunk_titans_linear
from references.titans import naive_titans_linear

import walk_grads  # tests/walk_grads.py
from test_kernels_titans import NAMES, inputs

FLOAT32 = ("w", "b", "theta", "alpha", "eta", "initial_state", "initial_momentum")


def grads(fn, x, st, cu=None, chunk_size=16):
    """Every gradient of <o, dO> + <final M, dM> + <final S, dS>, and o."""
    return walk_grads.grads_and_o(fn, NAMES, x, st, cu, chunk_size)


@pytest.mark.parametrize("T,D,chunk_size,cu,big", [
    (70, 16, 16, None, False), (70, 16, 16, None, True), (57, 16, 16, [0, 21, 21, 22, 57], False),
    (70, 100, 64, None, False)])
def test_half_states_backward(monkeypatch, T, D, chunk_size, cu, big):
    """float16 q, k, v (T = 70: 5 mini-batches, the last partial; sequences of 21, 0, 1 and 35
    tokens; D = 100 in 64-token mini-batches, the widest tiles: the backward's first kernel
    takes the states' columns in blocks, its last their rows): o and every gradient within
    1e-3 of float64 on the same rounded inputs (measured 1.2e-4 to 3.3e-4; from float32 states
    8.7e-5 to 3.0e-4: float16's rounding of q, k, v and of o, dq, dk, dv), and the float32
    gradients (w, b, the gates', the initial states') within 2.5e-4 of the float32 states'
    (measured 4e-6 to 2.0e-4; with G formed from the rounded M0 instead of the stored Z up to
    2.9e-4 and 3.3e-4 at D = 16, 1.8e-4 at D = 100).
    big: an initial memory of ~1e6, past float16's 65504, with Q 1e-6 of its size so that
    o stays in float16's range: o and the float32 gradients within the same 1e-3 of float64
    (measured <= 5.2e-4, deta's inner products with M0 to float16's 11 bits; dq, dk and dv are
    ~1e6 themselves); stored unscaled, M0 is inf and so is o."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    x, st, cu = inputs(1, T, 2, D, cu=cu)
    x = {n: (t.half() if n in "qkv" else t) for n, t in x.items()}
    if big:
        x["q"] = (x["q"].float() * 1e-6).half()
        st["initial_state"] = st["initial_state"] * 1e7
    full = grads(chunk_titans_linear, x, st, cu, chunk_size)
    monkeypatch.setattr(chunk, "HALF_STATES_BACKWARD", {"float16": "float16"})
    got = grads(chunk_titans_linear, x, st, cu, chunk_size)
    ref = grads(naive_titans_linear, {n: t.double() for n, t in x.items()},
                {n: s.double() for n, s in st.items()}, cu, chunk_size)
    for name in ref if not big else ("o",) + FLOAT32:  # big: dq, dk, dv ~1e6, past float16
        assert rel_error(got[name], ref[name]) < 1e-3, (name, rel_error(got[name], ref[name]))
    for name in FLOAT32 if not big else ():
        assert rel_error(got[name], full[name].double()) < 2.5e-4, name


def test_half_states_backward_takes_float16_only(monkeypatch):
    """bfloat16 states (8 bits) for the backward are refused before any kernel runs."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    monkeypatch.setattr(chunk, "HALF_STATES_BACKWARD", {"float16": "bfloat16"})
    x, st, _ = inputs(1, 20, 1, 16)
    q = x["q"].half().requires_grad_()
    with pytest.raises(ValueError, match="HALF_STATES_BACKWARD must name 'float16' or None "
                                         "per dtype, got 'bfloat16' for torch.float16"):
        chunk_titans_linear(q, *(x[n].half() if n in "kv" else x[n] for n in NAMES[1:]), **st)
