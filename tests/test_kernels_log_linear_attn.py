"""chunk_log_linear_attn, forward and backward (Triton, through the interpreter,
bounds-checked), against the definition (references.log_linear_attn.naive_log_linear_attn) in
float64, autograd's gradients of it for the backward.

float32 bound 1e-5: the products are exact ("ieee") over 64-token chunks and head dims <= 100,
the decays are exp of float64 differences of cumulative log gates rounded to float32, and the
level states and accumulators are float32 sums over at most T tokens; measured 7e-8 to 9e-7
(dg at T = 1100 the largest: its chunk-to-chunk carry sums 18 chunks). A level read from the
wrong Fenwick bucket, a state merged at the wrong trailing-zero count, a weight from the wrong
level or a decay off by one token moves a quantity by 1e-2 or more.
"""

import pytest
import torch

from harness.check.engine import rel_error
from kernels.log_linear_attn import chunk, chunk_log_linear_attn
from references.log_linear_attn import naive_log_linear_attn
from references.operators import levels_needed


def inputs(B, T, G, H, K, V, seed=0, gate=None):
    gen = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, G, K, generator=gen), "k": torch.randn(B, T, G, K, generator=gen),
         "v": torch.randn(B, T, H, V, generator=gen)}
    x["g"] = (torch.full((B, T, H), gate) if gate is not None
              else -torch.nn.functional.softplus(torch.randn(B, T, H, generator=gen) - 2))
    x["level_scales"] = torch.rand(B, T, H, levels_needed(T) + 1, generator=gen)
    return x


def grads(x, cu=None, dtype=torch.float32, seed=1):
    """(ours, the definition's) o and gradients of <o, dO> for q, k, v, g, level_scales: q, k,
    v rounded to dtype first, the definition in float64 on the rounded values."""
    cu = None if cu is None else torch.tensor(cu)
    do = torch.randn(x["v"].shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for fn, wide in ((chunk_log_linear_attn, torch.float32),
                     (naive_log_linear_attn, torch.float64)):
        a = {n: (t.to(dtype) if n in "qkv" else t) for n, t in x.items()}
        if fn is naive_log_linear_attn:
            a = {n: t.double() for n, t in a.items()}
        a = {n: t.detach().requires_grad_() for n, t in a.items()}
        o, _ = fn(**a, cu_seqlens=cu)
        (o.to(wide) * do.to(wide)).sum().backward()
        out.append({"o": o.detach(), **{"d" + n: t.grad for n, t in a.items()}})
    return out


def both(x, cu=None, dtype=torch.float32, scale=None):
    cu = None if cu is None else torch.tensor(cu)
    half = {n: (t.to(dtype) if n in "qkv" else t) for n, t in x.items()}
    with torch.no_grad():
        got, _ = chunk_log_linear_attn(**half, cu_seqlens=cu, scale=scale)
    ref, _ = naive_log_linear_attn(**{n: t.double() for n, t in half.items()}, cu_seqlens=cu,
                                   scale=scale)
    return got, ref


# T = 70 and 200 (partial last chunks), 130 with groups (G = 2, H = 4) and K, V not powers of
# two, 1100 (18 chunks: five levels above the chunk's, every merge depth to 4), T = 1
@pytest.mark.parametrize("B,T,G,H,K,V", [
    (1, 70, 1, 1, 16, 16),
    (1, 200, 1, 2, 20, 48),
    (2, 130, 2, 4, 32, 70),
    (1, 1100, 1, 1, 16, 16),
    (2, 1, 1, 1, 16, 16),
])
def test_forward(B, T, G, H, K, V):
    got, ref = both(inputs(B, T, G, H, K, V))
    assert torch.isfinite(got).all()
    assert rel_error(got, ref) < 1e-5, rel_error(got, ref)


# the forward's shapes and K = 100 (two key tiles in the local kernel); T = 1100 also walks the
# reverse accumulators through blocks of every size to 8 chunks and a partial top block
@pytest.mark.parametrize("B,T,G,H,K,V", [
    (1, 70, 1, 1, 16, 16),
    (1, 200, 1, 2, 20, 48),
    (2, 130, 2, 4, 32, 70),
    (1, 90, 1, 2, 100, 48),
    (1, 1100, 1, 1, 16, 16),
    (2, 1, 1, 1, 16, 16),
])
def test_gradients(B, T, G, H, K, V):
    got, ref = grads(inputs(B, T, G, H, K, V))
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_far_pairs_with_weak_gates():
    """Log gates of -1e-3 a step: pairs 1000 tokens apart keep weight 0.37, so a state or
    accumulator holding a chunk it should not (or missing one) moves o or a gradient by
    1e-2 or more; with the gates above such pairs weigh exp(-130) and hide it."""
    got, ref = grads(inputs(1, 1100, 1, 1, 16, 16, gate=-1e-3))
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


@pytest.mark.parametrize("switches", [{"WALK_STATES": True}, {"WALK_LOCAL": True},
                                      {"BWD_WALK_STATES": False},
                                      {"WALKS_TOGETHER": False},
                                      {"WALKS_TOGETHER": False, "BWD_WALK_STATES": False}])
@pytest.mark.parametrize("B,T,G,H,K,V,cu,gate", [
    (1, 1100, 1, 1, 16, 16, None, -1e-3),
    (2, 130, 2, 4, 100, 70, None, None),
    (1, 401, 1, 2, 16, 16, [0, 70, 70, 71, 401], None),
])
def test_switches(monkeypatch, switches, B, T, G, H, K, V, cu, gate):
    """chunk.WALK_STATES (the forward's walk) and chunk.BWD_WALK_STATES (the dq walk): the
    walk forms each chunk's own state instead of reading the local kernel's buffer (left empty
    when the walk forms them: a read of it is out of bounds); chunk.WALK_LOCAL: the forward's
    walk forms each chunk's own output too (no buffer, no local kernel); chunk.WALKS_TOGETHER off: the
    backward's two walks in two launches, one scratch between them. Same bound, same reasons;
    measured as the default (the same products, in other kernels)."""
    for name, value in switches.items():
        monkeypatch.setattr(chunk, name, value)
    got, ref = grads(inputs(B, T, G, H, K, V, gate=gate), cu=cu)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_varlen_gradients():
    """Sequences of 70, 0, 1 and 330 tokens: the walks and the gate's carry restart at each."""
    got, ref = grads(inputs(1, 401, 1, 2, 16, 16), cu=[0, 70, 70, 71, 401])
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_saturating_gates_keep_the_gate_gradient_exact():
    """Log gates of -60 a step: every pair that straddles a token underflows, so dg is tiny
    (about 1e-26) while the diagonal pairs are of order 1. dg summed as row sums minus column
    sums would be rounding noise of the diagonal (relative error about 1e19); summed over the
    straddling pairs it stays within float32's rounding: measured 1.5e-7."""
    got, ref = grads(inputs(1, 300, 1, 1, 16, 16, gate=-60.))
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_float16_gradients_within_their_rounding():
    """float16 q, k, v: every gradient within 2e-3 (the scores' and states' products in float16
    with float32 sums, gradients stored in float16: a few units of 4.9e-4; measured 2.2e-4 to
    3.7e-4)."""
    got, ref = grads(inputs(1, 200, 1, 2, 32, 32), dtype=torch.float16)
    for name in ("dq", "dk", "dv"):
        assert got[name].dtype == torch.float16
    for name in ref:
        assert rel_error(got[name], ref[name]) < 2e-3, (name, rel_error(got[name], ref[name]))


def test_varlen_levels_restart_at_each_sequence():
    """Sequences of 70, 0, 1 and 330 tokens in one row: each one's positions (and so its
    levels) start at its first token."""
    got, ref = both(inputs(1, 401, 1, 2, 16, 16), cu=[0, 70, 70, 71, 401])
    assert rel_error(got, ref) < 1e-5, rel_error(got, ref)


def test_saturating_gates_stay_finite():
    """Log gates of -60 a step: every decay across a chunk underflows to 0 (exp(-3840)), the
    level states' decays too; the output is the diagonal's and stays exact."""
    got, ref = both(inputs(1, 300, 1, 1, 16, 16, gate=-60.), scale=1.0)
    assert torch.isfinite(got).all()
    assert rel_error(got, ref) < 1e-5, rel_error(got, ref)


@pytest.mark.parametrize("name, t, value", [("v", 40, "inf"), ("v", 3, "nan"), ("k", 66, "nan"),
                                            ("g", 20, "nan"), ("level_scales", 50, "inf")])
def test_a_non_finite_token_reaches_only_its_future(name, t, value):
    """A NaN or inf planted in every channel of one token (of the second of two sequences, T =
    70: tokens 3 to 66 of both chunks): the outputs before it and the other sequence's are the
    clean inputs' bit for bit, and from it on, the finite outputs are the definition's (a
    masked-out future v times 0 inside the chunk's product would be NaN: masks select)."""
    cu = torch.tensor([0, 2, 72])
    x = inputs(1, 72, 1, 2, 16, 16)
    dirty = {n: a.clone() for n, a in x.items()}
    dirty[name][0, 2 + t] = float(value)
    with torch.no_grad():
        clean, _ = chunk_log_linear_attn(**x, cu_seqlens=cu)
        got, _ = chunk_log_linear_attn(**dirty, cu_seqlens=cu)
        ref, _ = naive_log_linear_attn(**{n: a.double() for n, a in dirty.items()}, cu_seqlens=cu)
    assert torch.equal(got[:, :2 + t], clean[:, :2 + t])
    assert torch.equal(got[:, 2 + t:].isfinite(), ref[:, 2 + t:].isfinite())


@pytest.mark.parametrize("B,T,G,H,K,V,cu,plant", [
    (1, 72, 1, 2, 16, 16, [0, 2, 72], ("v", 42)),
    (2, 130, 2, 4, 100, 70, None, None),
])
def test_walk_local_gives_the_two_kernels_values(monkeypatch, B, T, G, H, K, V, cu, plant):
    """chunk.WALK_LOCAL: the walk forms each chunk's own output with the local kernel's
    products, summed with the levels' parts in the same order, so o is the two-kernel
    forward's bit for bit: with groups, K and V not powers of two, varlen, and a NaN planted in
    v (which reaches the same rows)."""
    x = inputs(B, T, G, H, K, V)
    if plant is not None:
        x[plant[0]][0, plant[1]] = float("nan")
    cu = None if cu is None else torch.tensor(cu)
    with torch.no_grad():
        monkeypatch.setattr(chunk, "WALK_LOCAL", False)
        two, _ = chunk_log_linear_attn(**x, cu_seqlens=cu)
        monkeypatch.setattr(chunk, "WALK_LOCAL", True)
        one, _ = chunk_log_linear_attn(**x, cu_seqlens=cu)
    assert torch.equal(one.isnan(), two.isnan()) and one.isnan().any() == (plant is not None)
    assert torch.equal(one.nan_to_num(), two.nan_to_num())


@pytest.mark.parametrize("setting,grad,no_grad_mode,launched", [
    (None, False, False, False),  # the default, inference: one kernel
    (None, True, True, False),  # inputs that require grad, under torch.no_grad: inference
    (None, True, False, True),  # the default, training: two kernels
    (True, True, False, False),
    (False, False, False, True),
])
def test_walk_local_by_default_without_gradients(monkeypatch, setting, grad, no_grad_mode,
                                                 launched):
    """chunk.WALK_LOCAL None (the default): the forward runs as the walk alone when no input
    needs a gradient (no float32 buffers), as two kernels when one does (faster; the buffers
    are freed before the backward); True and False force either. Counted by the local kernel's
    launches."""
    launches = []

    class Counted:  # the local kernel, counting its launches
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(chunk, "WALK_LOCAL", setting)
    monkeypatch.setattr(chunk, "chunk_log_linear_attn_fwd_local_kernel",
                        Counted(chunk.chunk_log_linear_attn_fwd_local_kernel))
    x = {n: t.requires_grad_(grad) for n, t in inputs(1, 70, 1, 2, 16, 16).items()}
    with torch.set_grad_enabled(not no_grad_mode):
        o, _ = chunk_log_linear_attn(**x)
    assert bool(launches) == launched and o.requires_grad == (grad and not no_grad_mode)


def test_minus_inf_gates_mask_exactly():
    """A log gate of -inf cuts every pair across it (a mask): o and every gradient as the
    definition's, finite (exp(-inf - -inf) would be NaN; the kernels read -inf as -1e4)."""
    x = inputs(1, 200, 1, 2, 16, 16)
    x["g"][0, [5, 64, 130]] = -float("inf")
    got, ref = grads(x)
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_float16_gate_gradient_does_not_drift_over_chunks():
    """dg's carry across chunks adds pairs of chunks from the reverse walk and takes them out
    from the forward walk: if their products round differently, the differences add up chunk
    after chunk. float16, 16 chunks: dg within float16's rounding like the other gradients
    (measured 1.9e-4; bound 5e-4). With the float32 states rounded to float16
    (chunk.WALK_MIXED = "round") it read 1.08e-3, growing with T (6.4e-3 at 16384 tokens),
    while the carry held the neighbouring chunks' pairs; 1.95e-4 since it leaves them out."""
    got, ref = grads(inputs(1, 1024, 1, 1, 32, 32), dtype=torch.float16)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 5e-4, (name, rel_error(got[name], ref[name]))


def test_float32_gate_gradient_carry_does_not_drift():
    """dg's carry Z_n (the pairs jumping over chunk n) is summed chunk after chunk. Log gates
    of -30 a step but 0 at each chunk's first token: Z_n is about 0 while the pair of tokens
    across each chunk boundary is of order 1. Summed from both walks' whole sums, the carry
    takes float32's rounding of that pair at every chunk and adds it to every later token's
    dg: measured 4.5e-6 (16 chunks; the long family's strong gates reached 2.2e-6 at 65536
    tokens on an H200, past the check's tolerance). Summed from the pairs beyond the
    neighbouring chunk only (stages.adjacent_state): 1.4e-7, float32's own rounding. Bound
    5e-7."""
    x = inputs(1, 1024, 1, 1, 16, 16, gate=-30.)
    x["g"][0, ::64] = 0.
    got, ref = grads(x)
    for name in ref:
        bound = 5e-7 if name == "dg" else 1e-5
        assert rel_error(got[name], ref[name]) < bound, (name, rel_error(got[name], ref[name]))


def test_float16_within_its_rounding():
    """float16 q, k, v: within 2e-3 of float64 on the same rounded inputs (the scores and the
    states cast to float16 for their products with V and Q, and o stored in float16: a few
    units of 4.9e-4; measured 2.9e-4)."""
    got, ref = both(inputs(1, 200, 1, 2, 32, 32), dtype=torch.float16)
    assert got.dtype == torch.float16
    assert rel_error(got, ref) < 2e-3, rel_error(got, ref)


def test_bad_arguments_raise_before_any_launch():
    x = inputs(1, 16, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_log_linear_attn(**x, initial_state=torch.zeros(1, 1, 16, 16))
    big = inputs(1, 16, 1, 1, 272, 16)
    with pytest.raises(ValueError, match="K must be <= 256"):
        chunk_log_linear_attn(**big)
