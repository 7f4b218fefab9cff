"""fused_chunk_ttt_linear and chunk_ttt_linear (Triton, through the interpreter) against the
token-by-token float64 reference (references.ttt.naive_ttt_linear): the forward, and every
gradient against autograd through the reference (chunk_ttt_linear's backward is its own,
split around a shorter walk: kernels/ttt/chunk_bwd.py, both settings of its switch).

float32 bound 1e-5: every product multiplies float32 operands exactly ("ieee") over at most 64
tokens and D <= 40 here, and the LayerNorms are float32 sums over D; measured 1e-7 to 2e-7
(gradients 1e-7 to 5e-7). A padded row reaching the LayerNorm statistics or the weight update,
a wrong learning rate for a partial mini-batch, a state not carried or a missed term of the
LayerNorm backward's own backward is >= 1e-3.
"""

import pytest
import torch

from harness.check.engine import rel_error
from kernels.ttt import chunk_ttt_linear, fused_chunk_ttt_linear
from references.ttt import naive_ttt_linear

import walk_grads  # tests/walk_grads.py


def inputs(B, T, H, D, h0=True, bias=True, cu=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = B if cu is None else len(cu) - 1
    x = {n: torch.randn(B, T, H, D, generator=g) for n in "qkv"}
    x["w"] = 1 + 0.1 * torch.randn(H, D, generator=g)
    x["b"] = 0.1 * torch.randn(H, D, generator=g)
    x["eta"] = 0.05 * torch.rand(B, T, H, 1, generator=g)
    st = {"initial_state": 0.1 * torch.randn(N, H, D, D, generator=g) if h0 else None,
          "initial_state_bias": 0.1 * torch.randn(N, H, 1, D, generator=g) if bias else None}
    return x, st, None if cu is None else torch.tensor(cu)


KERNELS = pytest.mark.parametrize("fn", [fused_chunk_ttt_linear, chunk_ttt_linear],
                                  ids=["fused_chunk", "chunk"])


def both(fn, B, T, H, D, chunk_size=16, dtype=torch.float32, **kw):
    x, st, cu = inputs(B, T, H, D, **kw)
    args = dict(chunk_size=chunk_size, output_final_state=True, cu_seqlens=cu)
    with torch.no_grad():
        got = fn(*(x[n].to(dtype) for n in ("q", "k", "v")), x["w"], x["b"],
                                     x["eta"], **st, **args)
    ref = naive_ttt_linear(*(x[n].to(dtype).double() for n in ("q", "k", "v")),
                           *(x[n].double() for n in ("w", "b", "eta")),
                           **{n: None if s is None else s.double() for n, s in st.items()},
                           **args)
    return got, ref


# T = 70: a last mini-batch of 6; D = 20: not a power of two; chunk sizes 32 and 64 with partial
# last mini-batches; T = 1; no initial state, or weights without a bias
@pytest.mark.parametrize("B,T,H,D,chunk_size,kw", [
    (2, 70, 2, 16, 16, {}),
    (1, 37, 1, 20, 16, {}),
    (1, 100, 1, 16, 32, {}),
    (1, 70, 2, 32, 64, {}),
    (2, 1, 1, 16, 16, {}),
    (1, 40, 2, 16, 16, {"h0": False, "bias": False}),
    (1, 40, 1, 16, 16, {"bias": False}),
])
@KERNELS
def test_forward_and_final_states(fn, B, T, H, D, chunk_size, kw):
    got, ref = both(fn, B, T, H, D, chunk_size, **kw)
    for name, a, r in zip(("o", "final state", "final bias"), got, ref):
        assert rel_error(a, r) < 1e-5, (name, rel_error(a, r))


@KERNELS
def test_varlen_with_empty_and_one_token_sequences(fn):
    """Sequences of 21, 0, 1 and 35 tokens: each ends in its own partial mini-batch, the empty
    one's final state is its initial one."""
    got, ref = both(fn, 1, 57, 2, 16, cu=[0, 21, 21, 22, 57])
    for name, a, r in zip(("o", "final state", "final bias"), got, ref):
        assert rel_error(a, r) < 1e-5, (name, rel_error(a, r))


@pytest.mark.parametrize("mode,state_bound", [("round", 1e-3), ("split", 1e-5), (None, 1e-5)])
@KERNELS
def test_float16_within_its_rounding(monkeypatch, fn, mode, state_bound):
    """float16 q, k, v (w, b, eta float32): o within 1e-3 of float64 on the same rounded inputs
    (measured 2e-4; float16's unit roundoff is 4.9e-4, o is stored in float16). The final
    weights are float32: within 1e-5 when the walks' products keep the state's float32 value
    (WALK_MIXED "split" or None; measured 1e-7 to 2e-7), within 1e-3 when they round it to
    float16 ("round", the default: one roundoff 4.9e-4 on each update's operand; measured 1.0e-4
    to 1.8e-4)."""
    from kernels.ttt import fused_chunk

    monkeypatch.setattr(fused_chunk, "WALK_MIXED", mode)
    got, ref = both(fn, 1, 70, 2, 16, dtype=torch.float16)
    assert got[0].dtype == torch.float16
    assert rel_error(got[0], ref[0]) < 1e-3
    assert rel_error(got[1], ref[1]) < state_bound and rel_error(got[2], ref[2]) < state_bound


def grads(fn, x, st, cu, chunk_size, dtype, seed=1):
    """Every gradient of <o, dO> + <final W, dW> + <final hb, dhb> (fixed random dO, dW, dhb),
    the inputs in ``dtype`` (None: as given)."""
    return walk_grads.grads(fn, ("q", "k", "v", "w", "b", "eta"), x, st, cu, chunk_size, dtype,
                            seed)


# a partial last mini-batch; D = 20; chunk 32 without an initial bias; no initial state; varlen
# with empty and one-token sequences
@pytest.mark.parametrize("B,T,H,D,chunk_size,kw", [
    (1, 40, 2, 16, 16, {}),
    (2, 37, 1, 20, 16, {}),
    (1, 70, 1, 32, 32, {"bias": False}),
    (1, 40, 1, 16, 16, {"h0": False, "bias": False}),
    (1, 57, 2, 16, 16, {"cu": [0, 21, 21, 22, 57]}),
])
@KERNELS
def test_gradients(fn, B, T, H, D, chunk_size, kw):
    x, st, cu = inputs(B, T, H, D, **kw)
    got = grads(fn, x, st, cu, chunk_size, torch.float32)
    ref = grads(naive_ttt_linear, x, st, cu, chunk_size, torch.float64)
    assert set(got) == set(ref)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


@KERNELS
def test_paired_row_sums(monkeypatch, fn):
    """The GPU's form of kernels.common.layernorm.row_sums, both sums in one reduction (the
    interpreter takes them apart: ROW_SUMS_APART), through the interpreter here: every
    gradient of o and the final states within 1e-5 of float64 (the forward's LayerNorm gradient
    and its backward take all three pairs). Pairing sum(gx) with itself puts them 0.59 off."""
    from kernels.common import layernorm

    monkeypatch.setattr(layernorm, "ROW_SUMS_APART", False)
    x, st, cu = inputs(1, 20, 1, 16)
    got = grads(fn, x, st, cu, 16, torch.float32)
    ref = grads(naive_ttt_linear, x, st, cu, 16, torch.float64)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


@pytest.mark.parametrize("B,T,H,D,chunk_size,kw", [
    (2, 37, 1, 20, 16, {}),
    (1, 57, 2, 16, 16, {"cu": [0, 21, 21, 22, 57]}),
])
def test_chunk_gradients_with_dk_in_the_walk(monkeypatch, B, T, H, D, chunk_size, kw):
    """chunk_bwd.DK_IN_WALK: dK's dW'-side term taken in the walk, nothing stored per
    mini-batch; the same 1e-5 bound."""
    from kernels.ttt import chunk_bwd

    monkeypatch.setattr(chunk_bwd, "DK_IN_WALK", True)
    x, st, cu = inputs(B, T, H, D, **kw)
    got = grads(chunk_ttt_linear, x, st, cu, chunk_size, torch.float32)
    ref = grads(naive_ttt_linear, x, st, cu, chunk_size, torch.float64)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


@pytest.mark.parametrize("mode", ["split", "tf32", "round", None])
@KERNELS
def test_walk_mixed_modes_in_float16(monkeypatch, fn, mode):
    """fused_chunk.WALK_MIXED: the walks' products of float16 rows and the float32 state in
    each utils.dot_mixed mode and as float32 products (None). Every gradient within 1e-3 of
    float64 on the same rounded inputs (the gradients are stored in float16, unit roundoff
    4.9e-4; measured 1.4e-4 to 3.1e-4, "round" up to 3.8e-4), and "split" and "round" are not
    None's results (the interpreter takes TF32 products exactly, so "tf32" may be)."""
    from kernels.ttt import fused_chunk

    x, st, cu = inputs(1, 70, 2, 32)
    rounded = {n: t.half().float() if n in "qkv" else t for n, t in x.items()}
    ref = grads(naive_ttt_linear, rounded, st, cu, 16, torch.float64)
    half = {n: t.half() if n in "qkv" else t for n, t in x.items()}
    monkeypatch.setattr(fused_chunk, "WALK_MIXED", None)
    exact = grads(fn, half, st, cu, 16, None)
    monkeypatch.setattr(fused_chunk, "WALK_MIXED", mode)
    got = grads(fn, half, st, cu, 16, None)
    for name in ref:
        assert rel_error(got[name].double(), ref[name]) < 1e-3, (name, mode)
    if mode in ("split", "round"):
        assert not torch.equal(got["k"], exact["k"])


@pytest.mark.parametrize("mode", ["round", "split"])
@KERNELS
def test_output_mixed_in_float16(monkeypatch, fn, mode):
    """fused_chunk.OUTPUT_MIXED: the outputs' Q~ K^T and Q~ W from Q~ rounded to float16 (and W
    rounded, "round", or split in two halves, "split"). o within 1e-3 of float64 on the same
    rounded inputs (float16's unit roundoff 4.9e-4 on Q~ and W where the products read them;
    measured 3.0e-4 "round", 2.8e-4 "split", 2.4e-4 with float32 products) and not the float32
    products' o; the final states are the walk's, bit for bit; float32 inputs are unchanged."""
    from kernels.ttt import fused_chunk

    runs = {}
    for name, value, dtype in (("exact", None, torch.float16), ("exact32", None, torch.float32),
                               ("got", mode, torch.float16), ("got32", mode, torch.float32)):
        monkeypatch.setattr(fused_chunk, "OUTPUT_MIXED", value)
        runs[name] = both(fn, 1, 70, 2, 20, dtype=dtype)
    got, ref = runs["got"]
    assert rel_error(got[0].double(), ref[0]) < 1e-3, rel_error(got[0].double(), ref[0])
    assert not torch.equal(got[0], runs["exact"][0][0])
    for i in (1, 2):
        assert torch.equal(got[i], runs["exact"][0][i])
    for i in range(3):
        assert torch.equal(runs["got32"][0][i], runs["exact32"][0][i])


@KERNELS
def test_half_states(monkeypatch, fn):
    """fused_chunk.HALF_STATES: the W per mini-batch (and chunk's backward's dW' per
    mini-batch) stored in float16 for float16 inputs. o and every gradient within 1e-3 of
    float64 on the same rounded inputs (float16's unit roundoff 4.9e-4 on W where a product
    reads it; measured o 2.7e-4, gradients 1.4e-4 to 4.0e-4, against 2.4e-4 and up to 3.8e-4
    with float32 states), and not the float32 states' results; float32 inputs keep float32
    states (the same values bit for bit)."""
    from kernels.ttt import fused_chunk

    x, st, cu = inputs(1, 70, 2, 32)
    rounded = {n: t.half().float() if n in "qkv" else t for n, t in x.items()}
    ref = grads(naive_ttt_linear, rounded, st, cu, 16, torch.float64)
    half = {n: t.half() if n in "qkv" else t for n, t in x.items()}
    monkeypatch.setattr(fused_chunk, "HALF_STATES", False)
    full = grads(fn, half, st, cu, 16, None)
    exact32 = grads(fn, x, st, cu, 16, torch.float32)
    monkeypatch.setattr(fused_chunk, "HALF_STATES", True)
    args = [half[n] for n in ("q", "k", "v", "w", "b", "eta")]
    *_, hs, _ = fused_chunk.run_forward(*args, 0.25, 1e-6, 16, None, None, False, None,
                                        keep_states=True)
    assert hs.dtype == torch.float16
    got = grads(fn, half, st, cu, 16, None)
    for name in ref:
        assert rel_error(got[name].double(), ref[name]) < 1e-3, name
    assert not torch.equal(got["q"], full["q"])
    got32 = grads(fn, x, st, cu, 16, torch.float32)
    for name in exact32:
        assert torch.equal(got32[name], exact32[name]), name


@KERNELS
def test_walk_prefetch_changes_no_value(monkeypatch, fn):
    """fused_chunk.WALK_PREFETCH and chunk_bwd.PREFETCH: the next mini-batch's rows loaded
    ahead in the forward and backward walks give the same values bit for bit (the same products
    on the same rows), over sequences of 21, 0, 1 and 35 tokens (the load past a sequence's
    last mini-batch reads nothing)."""
    from kernels.ttt import chunk_bwd, fused_chunk

    def prefetch(on):
        monkeypatch.setattr(fused_chunk, "WALK_PREFETCH", on)
        monkeypatch.setattr(chunk_bwd, "PREFETCH", on)

    x, st, cu = inputs(1, 57, 2, 16, cu=[0, 21, 21, 22, 57])
    args = [x[n] for n in ("q", "k", "v", "w", "b", "eta")]
    prefetch(False)
    default = grads(fn, x, st, cu, 16, torch.float32)
    with torch.no_grad():
        out = fn(*args, **st, output_final_state=True, cu_seqlens=cu)
        prefetch(True)
        ahead = fn(*args, **st, output_final_state=True, cu_seqlens=cu)
    for a, r in zip(ahead, out):
        assert torch.equal(a, r)
    got = grads(fn, x, st, cu, 16, torch.float32)
    for name in default:
        assert torch.equal(got[name], default[name]), name


@KERNELS
def test_widest_tiles(fn):
    """64-token mini-batches at D = 100 (tiles of 64 x 128, the widest: the backward loads Q~
    and W again for its last products there, kernels/ttt/fused_chunk.py RELOAD_TILE), a
    partial last mini-batch of 6: o, both final states and every gradient within the 1e-5 of
    float32 (measured 1.4e-7 to 2.7e-7)."""
    got, ref = both(fn, 1, 70, 1, 100, 64)
    for name, a, r in zip(("o", "final state", "final bias"), got, ref):
        assert rel_error(a, r) < 1e-5, (name, rel_error(a, r))
    x, st, cu = inputs(1, 70, 1, 100)
    got = grads(fn, x, st, cu, 64, torch.float32)
    ref = grads(naive_ttt_linear, x, st, cu, 64, torch.float64)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


@KERNELS
def test_bad_arguments_raise_before_any_launch(fn):
    x, st, _ = inputs(1, 16, 1, 16)
    args = [x[n] for n in ("q", "k", "v", "w", "b", "eta")]
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        fn(*args, chunk_size=8)
    big = inputs(1, 16, 1, 136)[0]
    with pytest.raises(ValueError, match="D must be <= 128"):
        fn(*(big[n] for n in ("q", "k", "v", "w", "b", "eta")))
