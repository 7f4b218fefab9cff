"""chunk_titans_linear (Triton, through the interpreter) against the token-by-token float64
reference (references.titans.naive_titans_linear): the output and both final states.

float32 bound 1e-5: every product multiplies float32 operands exactly ("ieee") over at most 64
tokens and D <= 32 here, the LayerNorms are float32 sums over D, and the gates' segment
products are exp of float64 differences rounded to float32; measured 1e-7 to 3e-7. A padded
row reaching the update, the state carried from the wrong row of a partial mini-batch, a
momentum or forgetting factor off by one token, or a zero factor turned into 0/0 is >= 1e-3
(or nan).
"""

import pytest
import torch

from harness.check.engine import rel_error
from kernels.titans import chunk, chunk_titans_linear
from references.titans import naive_titans_linear

import walk_grads  # tests/walk_grads.py


def inputs(B, T, H, D, h0=True, s0=True, cu=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = B if cu is None else len(cu) - 1
    x = {n: torch.randn(B, T, H, D, generator=g) for n in "qkv"}
    x["w"] = 1 + 0.1 * torch.randn(H, D, generator=g)
    x["b"] = 0.1 * torch.randn(H, D, generator=g)
    x["theta"] = 0.05 * torch.rand(B, T, H, generator=g)
    x["alpha"] = 0.1 * torch.rand(B, T, H, generator=g)
    x["eta"] = 0.5 + 0.5 * torch.rand(B, T, H, generator=g)
    st = {"initial_state": 0.1 * torch.randn(N, H, D, D, generator=g) if h0 else None,
          "initial_momentum": 0.1 * torch.randn(N, H, D, D, generator=g) if s0 else None}
    return x, st, None if cu is None else torch.tensor(cu)


NAMES = ("q", "k", "v", "w", "b", "theta", "alpha", "eta")


def both(x, st, cu, chunk_size=16, dtype=torch.float32):
    """(kernel's (o, M, S), reference's) on the same inputs, q, k, v in ``dtype``."""
    args = {"chunk_size": chunk_size, "output_final_state": True, "cu_seqlens": cu}
    half = {n: (t.to(dtype) if n in "qkv" else t) for n, t in x.items()}
    got = chunk_titans_linear(*(half[n] for n in NAMES), **st, **args)
    ref = naive_titans_linear(*(half[n].double() for n in NAMES),
                              **{n: None if s is None else s.double() for n, s in st.items()},
                              **args)
    return got, ref


def check(got, ref, bound):
    for name, a, r in zip(("o", "final state", "final momentum"), got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_error(a, r) < bound, (name, rel_error(a, r))


# T = 70: a last mini-batch of 6; D = 20: not a power of two; chunk sizes 32 and 64 with partial
# last mini-batches; T = 1; no initial state; the memory or the momentum alone
@pytest.mark.parametrize("B,T,H,D,chunk_size,kw", [
    (2, 70, 2, 16, 16, {}),
    (1, 37, 1, 20, 16, {}),
    (1, 100, 1, 16, 32, {}),
    (1, 70, 2, 32, 64, {}),
    (2, 1, 1, 16, 16, {}),
    (1, 40, 2, 16, 16, {"h0": False, "s0": False}),
    (1, 40, 1, 16, 16, {"s0": False}),
    (1, 40, 1, 16, 16, {"h0": False}),
])
def test_forward_and_final_states(B, T, H, D, chunk_size, kw):
    x, st, cu = inputs(B, T, H, D, **kw)
    check(*both(x, st, cu, chunk_size), 1e-5)


def test_varlen_with_empty_and_one_token_sequences():
    """Sequences of 21, 0, 1 and 35 tokens: each ends in its own partial mini-batch, the empty
    one's final states are its initial ones."""
    x, st, cu = inputs(1, 57, 2, 16, cu=[0, 21, 21, 22, 57])
    got, ref = both(x, st, cu)
    check((got[0], got[1], got[2]), ref, 1e-5)
    assert torch.equal(got[1][1], st["initial_state"][1])


def test_zero_factors_and_underflow():
    """alpha = 1 (forget everything) and eta = 0 (drop the momentum) are factors of exactly 0:
    segments over them are exact zeros, not 0/0; forgetting factors of 1e-6 over a whole
    mini-batch underflow float32 (1e-96) inside it. All finite and within 1e-5."""
    x, st, cu = inputs(1, 70, 2, 16)
    x["alpha"][0, 5] = 1.
    x["alpha"][0, 17:19] = 1.
    x["eta"][0, 9] = 0.
    x["eta"][0, 33:36] = 0.
    x["alpha"][0, 48:64] = 1 - 1e-6
    check(*both(x, st, cu), 1e-5)


def test_products_of_small_factors_to_float32_rounding():
    """With theta = 0 the final momentum is exactly (eta_1 ... eta_T) S0. Factors near e^-20
    multiply to near e^-80; a float32 log or exponent of that carries up to 80 float32 ulps of
    1, so the product as much relatively: the logs and exponents are taken in float64, and each
    head's product is within a few float32 roundings of the float64 truth (bound 5e-7; float32
    logs and exponents gave 3.9e-6 here, float64 ones 5.9e-8)."""
    x, st, cu = inputs(2, 4, 4, 16)
    g = torch.Generator().manual_seed(3)
    x["theta"].zero_()
    x["eta"] = torch.exp(-20 - torch.rand(2, 4, 4, generator=g))
    got, ref = both(x, st, cu)
    err = ((got[2].double() - ref[2]).abs().amax((-2, -1))
           / ref[2].abs().amax((-2, -1)))
    assert err.max() < 5e-7, err.max()


# bound: 1e-3 from float16 states (11 bits, as the kernel's float16 rows), 4e-3 from bfloat16
# ones (8 bits: each stored value within 2^-9 = 2e-3 relative)
@pytest.mark.parametrize("stored,bound", [("float16", 1e-3), ("bfloat16", 4e-3)])
def test_half_states_in_calls_without_a_backward(monkeypatch, stored, bound):
    """chunk.HALF_STATES for float16 inputs: in a call without a backward the M0, S0 stored per
    mini-batch are half precision ("float16": rows scaled by powers of two) and the outputs
    kernel takes them in one exact product each (in TF32: the interpreter's products are
    float32); o within ``bound`` of float64 (measured 2.7e-4 from float16 states, 2.5e-3 from
    bfloat16 ones, 2.1e-4 from float32 ones; 0.17 with the outputs kernel's Q S0 term left
    out), the final states the float32 walk's bit for bit.
    A call with a backward stores float32 states: its o the HALF_STATES=None forward's bit for
    bit (the backward is checked against float64 with them in test_gradients_in_float16)."""
    x, st, cu = inputs(1, 70, 2, 16)
    monkeypatch.setattr(chunk, "REPLAY", None)
    monkeypatch.setattr(chunk, "WALK_PRODUCTS", None)  # the outputs kernel takes the states
    monkeypatch.setattr(chunk, "HALF_STATES", None)
    with torch.no_grad():
        full, _ = both(x, st, cu, dtype=torch.float16)
    monkeypatch.setattr(chunk, "HALF_STATES", {"float16": stored})
    with torch.no_grad():
        got, ref = both(x, st, cu, dtype=torch.float16)
    assert rel_error(got[0], ref[0]) < bound, rel_error(got[0], ref[0])
    assert not torch.equal(got[0], full[0])  # the states were rounded
    assert torch.equal(got[1], full[1]) and torch.equal(got[2], full[2])
    q = x["q"].half().requires_grad_()
    trained, _ = both({**x, "q": q}, st, cu, dtype=torch.float16)
    assert torch.equal(trained[0], full[0])


def test_float16_states_hold_any_magnitude(monkeypatch):
    """HALF_STATES "float16" scales each stored row into float16's range: with initial states
    of ~1e5 (past float16's 65504; q scaled down so that o stays in float16's range) o stays
    within 1e-3 of float64 (measured 3.2e-4); stored unscaled, the first mini-batches' states
    are inf and so is o."""
    x, st, cu = inputs(1, 40, 1, 16)
    x["q"] = 1e-2 * x["q"]
    st = {n: 1e6 * s for n, s in st.items()}
    monkeypatch.setattr(chunk, "REPLAY", None)
    monkeypatch.setattr(chunk, "WALK_PRODUCTS", None)
    monkeypatch.setattr(chunk, "HALF_STATES", {"float16": "float16"})
    with torch.no_grad():
        got, ref = both(x, st, cu, dtype=torch.float16)
    assert rel_error(got[0], ref[0]) < 1e-3, rel_error(got[0], ref[0])


@pytest.mark.parametrize("form", [None, "always"])
def test_walk_products(monkeypatch, form):
    """chunk.WALK_PRODUCTS: the forward walk stores G, Q~ M0 and Q~ S0 of each mini-batch and
    the outputs kernel takes them ("inference", the default, in calls without a backward;
    "always"), or the walk stores the states and that kernel forms the three from them (None).
    Over sequences of 21, 0, 1 and 35 tokens, with and without a backward: o within 1e-5 of
    float64 every way, and the same final states bit for bit (the walk carries the same M and
    S whatever it stores). Storing Q~ M0 in place of Q~ S0 puts o 1.25 off."""
    x, st, cu = inputs(1, 57, 2, 16, cu=[0, 21, 21, 22, 57])
    with torch.no_grad():
        products, ref = both(x, st, cu)
    monkeypatch.setattr(chunk, "WALK_PRODUCTS", form)
    with torch.no_grad():
        other, _ = both(x, st, cu)
    q = x["q"].clone().requires_grad_()
    trained, _ = both({**x, "q": q}, st, cu)
    for got in (products, other, trained):
        assert rel_error(got[0], ref[0]) < 1e-5, rel_error(got[0], ref[0])
        assert torch.equal(got[1], products[1]) and torch.equal(got[2], products[2])


def zero_and_fast_gates(x, fast):
    """Gates that test the walk's scales (stages.hand_on_scaled): forgetting factors of 1 -
    alpha = 0.4 throughout (fast: the memory's scale under 2^-40 every other mini-batch) or
    zero factors (alpha = 1, eta = 0) at a few tokens."""
    if fast:
        x["alpha"] = torch.full_like(x["alpha"], 0.6)
        x["eta"] = torch.full_like(x["eta"], 0.3)
    else:
        x["alpha"][:, [5, 40, 41]] = 1.
        x["eta"][:, [20, 52]] = 0.
    return x


@pytest.mark.parametrize("chain,rows", [(True, None), (False, None), (False, 16)])
@pytest.mark.parametrize("B,T,cu,gates,every", [
    (2, 70, None, None, 2), (1, 57, [0, 21, 21, 22, 57], None, 2), (1, 70, None, "zero", 2),
    (1, 70, None, "fast", 2), (1, 140, None, "fast", 8)])
def test_replay(monkeypatch, B, T, cu, gates, every, chain, rows):
    """chunk.REPLAY: without a backward the walk stores G and one state per segment of REPLAY
    mini-batches, carrying its states as scales times tiles (WALK_SCALES), and the replay
    carries the states over each segment from the one stored, in a chain (REPLAY_CHAIN) or
    unrolled over the segment's rows, all at once or (REPLAY_ROWS 16) one mini-batch's a
    program, each taking the updates of the mini-batches up to its own. Segments of 2 (T = 70: 5
    mini-batches, 3 segments, the last partial; sequences of 21, 0, 1 and 35 tokens; zero
    factors; factors that take a scale under its floor) and of 8 (T = 140: a segment of 8 and
    one of 1): o and both final states within 1e-5 of float64 (measured <= 2.1e-7) and within
    1e-6 of the walk's own products' (WALK_PRODUCTS "inference", the states in full; measured <=
    2.9e-7). A chain that does not hand the states on puts o 0.66 off; a floor that drops the
    scale without putting it into the tile, 0.48 (zero factors) and 3.6e4 (fast); the unrolled
    form without its own mini-batch's term (P theta^T), 0.6 to 1.06; without the earlier
    mini-batches' coefficients, 0.25 to 0.74; with beta not taking p0 alpha, 8e-3 to 0.04 (where
    p0 is not negligible); by rows, a program without its own mini-batch's updates, 0.9 to 1.05;
    every program on the segment's first rows, 0.24 to 3e28."""
    x, st, cu = inputs(B, T, 2, 16, cu=cu)
    if gates:
        x = zero_and_fast_gates(x, gates == "fast")
    monkeypatch.setattr(chunk, "REPLAY", None)
    with torch.no_grad():
        products, _ = both(x, st, cu)
    monkeypatch.setattr(chunk, "REPLAY", every)
    monkeypatch.setattr(chunk, "REPLAY_CHAIN", chain)
    monkeypatch.setattr(chunk, "REPLAY_ROWS", rows)
    with torch.no_grad():
        got, ref = both(x, st, cu)
    check(got, ref, 1e-5)
    for a, p in zip(got, products):
        assert rel_error(a, p) < 1e-6, rel_error(a, p)


@pytest.mark.parametrize("B,T,cu,every,rows", [
    (2, 70, None, 2, None), (1, 57, [0, 21, 21, 22, 57], 2, 16), (1, 140, None, 8, 32),
    (1, 100, [0, 40, 41, 100], 2, None)])
def test_replay_overlap(monkeypatch, B, T, cu, every, rows):
    """chunk.REPLAY_OVERLAP: the walk's and the segment kernel's programs in one launch, each
    taking its part from its ticket (segments in the order of their index in their sequence,
    for varlen through segment_order), give what the two launches give bit for bit (the same
    stages). Through the interpreter every walk runs before the first segment program: this
    checks the tickets' parts and that every wait ends (a walk that never signals hangs it), not
    a wait on a walk still running (the GPU's check). Cases as test_replay's, two or four
    programs a segment, sequences of 40, 1 and 59 tokens in segment_order. Broken once: varlen
    tickets decoded over N H heads, not H, leave rows of o unwritten (both varlen cases fail)."""
    x, st, cu = inputs(B, T, 2, 16, cu=cu)
    monkeypatch.setattr(chunk, "REPLAY", every)
    monkeypatch.setattr(chunk, "REPLAY_ROWS", rows)
    with torch.no_grad():
        two, _ = both(x, st, cu)
        monkeypatch.setattr(chunk, "REPLAY_OVERLAP", True)
        one, _ = both(x, st, cu)
    for name, a, b in zip(("o", "final state", "final momentum"), one, two):
        assert torch.equal(a, b), (name, float((a - b).abs().max()))


def test_replay_overlap_only_where_the_walks_leave_processors(monkeypatch):
    """The one launch is taken only where the N H walks take at most OVERLAP_SHARE of the
    GPU's SMs (more would walk in waves at one program a SM); else the walk and the segment
    kernel run apart. Here 4 walks at share 0.5: apart on 7 SMs, one launch on 8, the
    reference's values either way; on the CPU every count of walks fits. Broken once: `<`
    for `<=` (8 SMs ran apart)."""
    x, st, cu = inputs(2, 40, 2, 16)
    monkeypatch.setattr(chunk, "REPLAY", 2)
    monkeypatch.setattr(chunk, "REPLAY_ROWS", None)
    monkeypatch.setattr(chunk, "REPLAY_OVERLAP", True)
    monkeypatch.setattr(chunk, "OVERLAP_SHARE", 0.5)
    launched = {"gates": [], "overlap": []}

    class Spy:  # records a kernel's launches' arguments
        def __init__(self, name):
            self.name, self.kernel = name, getattr(chunk, f"chunk_titans_linear_fwd_{name}_kernel")

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched[self.name].append(args)
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in launched:
        monkeypatch.setattr(chunk, f"chunk_titans_linear_fwd_{name}_kernel", Spy(name))
    assert chunk.processors(torch.device("cpu")) == float("inf")
    for sms, one in ((7, False), (8, True)):
        monkeypatch.setattr(chunk, "processors", lambda device, sms=sms: sms)
        for calls in launched.values():
            calls.clear()
        with torch.no_grad():
            check(*both(x, st, cu), 1e-5)
        assert len(launched["overlap"]) == one, (sms, launched)
        # the flags the gates kernel zeroes are the one launch's (its 10th and 21st arguments)
        flags = launched["gates"][0][9]
        assert flags is (launched["overlap"][0][20] if one else None)


def test_gates_kernel_zeroes_the_one_launchs_flags():
    """The gates kernel's program (0, 0) zeroes the one launch's counter and flags (all NF of
    them, in blocks of 128: here 300), so that they need no launch of their own; the gates it
    stores are those of a launch without flags. Broken once: the zeroing left out (the flags
    kept their 7s)."""
    from kernels.titans.walk import chunk_titans_linear_fwd_gates_kernel

    B, T, H, D, C = 1, 40, 2, 16, 16
    x, _, _ = inputs(B, T, H, D)
    NT = -(-T // C)
    meta, out = chunk.walk_meta(x["q"], C), []  # as chunk_titans_linear launches it
    for flags in (None, torch.full((300,), 7, dtype=torch.int32)):
        gates = [torch.zeros(B, T, H, 2), torch.zeros(NT, H, 4), torch.zeros(NT, H, C, C),
                 torch.zeros(B, T, H, 2)]
        chunk_titans_linear_fwd_gates_kernel[(NT, B * H)](
            x["w"], x["b"], x["theta"], x["alpha"], x["eta"], *gates, flags, 300, None, None, T,
            H=H, D=D, BD=meta["BD"], BC=C, PRECISION=meta["PRECISION"], OUTPUTS=True)
        out.append(gates)
    assert torch.equal(flags, torch.zeros_like(flags))
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("every,rows,gprecision,says", [
    (3, None, None, "REPLAY must be a power of two"),
    (8, 24, None, "REPLAY_ROWS must be a power of two"),
    (8, {64: 24}, None, "REPLAY_ROWS must be a power of two"),  # per head tile: D = 16's is 64
    (8, 8, None, r"at least chunk_size \(16\), got 8"),
    (8, None, "bf16", r"REPLAY_G_PRECISION must be .* got 'bf16' for torch.float32")])
def test_replay_switches_are_checked(monkeypatch, every, rows, gprecision, says):
    x, st, _ = inputs(1, 40, 1, 16)
    monkeypatch.setattr(chunk, "REPLAY", every)
    monkeypatch.setattr(chunk, "REPLAY_ROWS", rows)
    monkeypatch.setattr(chunk, "REPLAY_G_PRECISION", gprecision)
    with torch.no_grad(), pytest.raises(ValueError, match=says):
        chunk_titans_linear(*(x[n] for n in NAMES), **st)


def test_replay_rows_are_checked_only_where_the_segment_kernel_runs(monkeypatch):
    """REPLAY_ROWS below chunk_size is refused by calls that replay (above), not by a call with a
    backward, which never does: its o is the o of the defaults bit for bit; nor by a call at a
    head tile the dict does not name."""
    x, st, _ = inputs(1, 40, 1, 16)
    monkeypatch.setattr(chunk, "REPLAY", 8)

    def trained():
        q = x["q"].clone().requires_grad_()
        return chunk_titans_linear(*(q if n == "q" else x[n] for n in NAMES), **st)[0].detach()

    plain = trained()
    monkeypatch.setattr(chunk, "REPLAY_ROWS", 8)
    assert torch.equal(trained(), plain)
    # per head tile: a tile other than D = 16's (64) gives its calls all of a segment's rows
    monkeypatch.setattr(chunk, "REPLAY_ROWS", {128: 8})
    with torch.no_grad():
        chunk_titans_linear(*(x[n] for n in NAMES), **st)


def test_bad_arguments_raise_before_any_launch():
    x, st, _ = inputs(1, 16, 1, 16)
    args = [x[n] for n in NAMES]
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        chunk_titans_linear(*args, chunk_size=8)
    x, _, _ = inputs(1, 16, 1, 256)
    with pytest.raises(ValueError, match="D must be <= 128"):
        chunk_titans_linear(*(x[n] for n in NAMES))

def test_the_one_walk_backward_refuses_64_token_mini_batches_at_d_128(monkeypatch):
    """They would not fit its shared memory (kernels/titans/chunk.py, MAX_TILE)."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", False)
    x, _, _ = inputs(1, 16, 1, 128)
    with pytest.raises(ValueError, match="chunk_size=64 takes D <= 64 with the one-walk"):
        chunk_titans_linear(*(x[n] for n in NAMES), chunk_size=64)


@pytest.mark.parametrize("D,chunk_size", [(100, 32), (32, 64)])
def test_widest_tiles(backward, D, chunk_size):
    """Mini-batches whose [C, D] tiles hold more than fused_bwd.RELOAD_TILE values (32 x 128 and
    64 x 64: the one-walk backward loads M0, S0, Q~ and K again for its last products), T = 70
    with a partial last mini-batch, both backwards: o, both final states and every gradient
    within float32's 1e-5 (measured 1.5e-7 to 4.0e-7)."""
    x, st, cu = inputs(1, 70, 1, D)
    check(*both(x, st, cu, chunk_size), 1e-5)
    got = grads(chunk_titans_linear, x, st, cu, chunk_size, torch.float32)
    ref = grads(naive_titans_linear, x, st, cu, chunk_size, torch.float64)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_64_token_mini_batches_at_d_128():
    """The split backward's widest tiles, 64 x 128 (D = 100 pads to 128): its first kernel loads
    Q~, K, M0 and S0 again for its later products, its last takes the states 32 rows at a time
    (chunk_bwd.RELOAD_TILE, GATES_ROWS). T = 70 with a partial last mini-batch: o, both final
    states and every gradient within float32's 1e-5."""
    x, st, cu = inputs(1, 70, 1, 100)
    check(*both(x, st, cu, 64), 1e-5)
    got = grads(chunk_titans_linear, x, st, cu, 64, torch.float32)
    ref = grads(naive_titans_linear, x, st, cu, 64, torch.float64)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


@pytest.fixture(params=[False, True], ids=["fused_bwd", "split_bwd"])
def backward(request, monkeypatch):
    """Both backwards: one walk with every product (fused_bwd.py), or three kernels with only
    the dM', dS' chain in the walk (chunk_bwd.py): chunk.SPLIT_BACKWARD."""
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", request.param)
    return request.param


def grads(fn, x, st, cu, chunk_size, dtype, seed=1):
    """Every gradient of <o, dO> + <final M, dM> + <final S, dS> (fixed random dO, dM, dS), the
    inputs in ``dtype`` (None: as given)."""
    return walk_grads.grads(fn, NAMES, x, st, cu, chunk_size, dtype, seed)


# a partial last mini-batch; D = 20; chunk 32 with the memory alone; no initial state; varlen
# with empty and one-token sequences; zero gate factors
@pytest.mark.parametrize("B,T,H,D,chunk_size,kw", [
    (1, 40, 2, 16, 16, {}),
    (2, 37, 1, 20, 16, {}),
    (1, 70, 1, 32, 32, {"s0": False}),
    (1, 40, 1, 16, 16, {"h0": False, "s0": False}),
    (1, 57, 2, 16, 16, {"cu": [0, 21, 21, 22, 57]}),
])
def test_gradients(backward, B, T, H, D, chunk_size, kw):
    """Every gradient within 1e-5 of autograd through the float64 reference (float32, the same
    products and sums as the forward's; measured 1.2e-7 to 3.6e-7)."""
    x, st, cu = inputs(B, T, H, D, **kw)
    got = grads(chunk_titans_linear, x, st, cu, chunk_size, torch.float32)
    ref = grads(naive_titans_linear, x, st, cu, chunk_size, torch.float64)
    assert set(got) == set(ref)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


def test_gradients_at_zero_factors(backward):
    """alpha = 1 and eta = 0 inside mini-batches: the gradients of those factors are the
    products of the others (the reference's segment products take them so), finite, within
    1e-5."""
    x, st, cu = inputs(1, 40, 1, 16)
    x["alpha"][0, 5] = 1.
    x["alpha"][0, 17:19] = 1.
    x["eta"][0, 9] = 0.
    x["eta"][0, 33:36] = 0.
    got = grads(chunk_titans_linear, x, st, cu, 16, torch.float32)
    ref = grads(naive_titans_linear, x, st, cu, 16, torch.float64)
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert rel_error(got[name], ref[name]) < 1e-5, (name, rel_error(got[name], ref[name]))


@pytest.mark.parametrize("switch", ["prefetch", "gates_ahead", "accumulate"])
def test_walk_switches_change_no_value(monkeypatch, switch):
    """chunk.WALK_PREFETCH and chunk_bwd.PREFETCH (the next mini-batch's rows loaded ahead in
    the forward and the split backward's walks), chunk.WALK_GATES_AHEAD (the forward walk's
    gate factors formed by a parallel kernel first), chunk.WALK_ACCUMULATE and
    chunk_bwd.WALK_ACCUMULATE (the walks' updates accumulated into the states' sums): the same
    values bit for bit (the same arithmetic on the same rows; through the interpreter a + (-b)
    is a - b, an accumulating product the product added, and the scale 1/4 at D = 16 exact on
    dU's rows as on the product), over sequences of 21, 0, 1 and 35 tokens (the load past a
    sequence's last mini-batch reads nothing)."""
    from kernels.titans import chunk_bwd

    def prefetch(on):
        if switch == "prefetch":
            monkeypatch.setattr(chunk, "WALK_PREFETCH", on)
            monkeypatch.setattr(chunk_bwd, "PREFETCH", on)
        elif switch == "accumulate":
            monkeypatch.setattr(chunk, "WALK_ACCUMULATE", on)
            monkeypatch.setattr(chunk_bwd, "WALK_ACCUMULATE", on)
        else:
            monkeypatch.setattr(chunk, "WALK_GATES_AHEAD", on)

    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)

    x, st, cu = inputs(1, 57, 2, 16, cu=[0, 21, 21, 22, 57])
    prefetch(False)
    default = grads(chunk_titans_linear, x, st, cu, 16, torch.float32)
    with torch.no_grad():
        out = both(x, st, cu)[0]
        prefetch(True)
        ahead = both(x, st, cu)[0]
    for a, r in zip(ahead, out):
        assert torch.equal(a, r)
    got = grads(chunk_titans_linear, x, st, cu, 16, torch.float32)
    for name in default:
        assert torch.equal(got[name], default[name]), name


@pytest.mark.parametrize("mode", [None, "round", "split", "tf32"])
def test_gradients_in_float16(monkeypatch, backward, mode):
    """float16 q, k, v: every gradient within 1e-3 of autograd through the float64 reference on
    the same rounded inputs (the kernel's float32 gradients of the float16 inputs are rounded
    to float16, 4.9e-4; "round" also rounds the state in the walks' products, once a product);
    the gradients' errors measured 1.6e-4 to 4.8e-4 under the three modes. "tf32" also takes
    the outputs' products of Q's float16 rows (OUTPUT_MIXED "tf32x2") in the forward and, as
    the forward does, in the split backward's first kernel (chunk_bwd.LOCAL_AS_OUTPUTS), and
    the last kernel's dK products in TF32 (chunk_bwd.DK_PRECISION): exact through the
    interpreter, so their arithmetic is checked here (the scale left off Q K^T in the first
    kernel: dq 0.28, fails) and their rounding on a GPU."""
    monkeypatch.setattr(chunk, "WALK_MIXED", mode)
    monkeypatch.setattr(chunk, "UPDATE_MIXED", None)  # the updates as WALK_MIXED's
    if mode == "tf32":
        from kernels.titans import chunk_bwd
        monkeypatch.setattr(chunk, "OUTPUT_MIXED", "tf32x2")
        monkeypatch.setattr(chunk_bwd, "LOCAL_AS_OUTPUTS", True)
        monkeypatch.setattr(chunk_bwd, "DK_PRECISION", "tf32")
    x, st, cu = inputs(1, 40, 2, 16)
    half = {n: (t.half() if n in "qkv" else t) for n, t in x.items()}
    got = grads(chunk_titans_linear, half, st, cu, 16, None)
    ref = grads(naive_titans_linear, {n: t.double() for n, t in half.items()},
                {n: None if s is None else s.double() for n, s in st.items()}, cu, 16, None)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-3, (name, rel_error(got[name], ref[name]))


@pytest.mark.parametrize("big", [False, True])
def test_half_grads(monkeypatch, big):
    """chunk_bwd.HALF_GRADS "float16": the split backward's walk stores dM', dS' in float16,
    each row scaled by a power of two, for the last kernel alone: dK and the inner products
    with M0, S0 that dalpha, deta take, each value to 11 bits (2^-12 relative). float16 q, k,
    v: every gradient within 1e-3 of float64 on the same rounded inputs (measured 1.6e-4 to
    3.3e-4; dk 2.9e-4 from float32 dM', dS', 3.3e-4 from float16 ones), and the other
    gradients those of float32 dM', dS' bit for bit. With the final states' gradients ~1e6
    (big: past float16's 65504, float32 inputs) every gradient stays within 1e-3 (measured
    <= 1.3e-4, against 3e-7 from float32 dM', dS'); stored unscaled, dM' is inf and so is
    dk."""
    from kernels.titans import chunk_bwd
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    x, st, cu = inputs(1, 40, 2, 16)
    dtype = torch.float32 if big else torch.float16
    x = {n: (t.to(dtype) if n in "qkv" else t) for n, t in x.items()}

    def states_times(f, c):  # the final states (and so their gradients) times c
        return lambda *args, **kw: (lambda o, m, s: (o, c * m, c * s))(*f(*args, **kw))

    fn, ref_fn = (states_times(f, 1e6 if big else 1.) for f in (chunk_titans_linear,
                                                                  naive_titans_linear))
    full = grads(fn, x, st, cu, 16, None)
    monkeypatch.setattr(chunk_bwd, "HALF_GRADS", "float16")
    got = grads(fn, x, st, cu, 16, None)
    ref = grads(ref_fn, {n: t.double() for n, t in x.items()},
                {n: None if s is None else s.double() for n, s in st.items()}, cu, 16, None)
    for name in ref:
        assert rel_error(got[name], ref[name]) < 1e-3, (name, rel_error(got[name], ref[name]))
        moved = name in ("k", "alpha", "eta")  # of <dM', M0>, <dM', S0>, <dS', S0> and dK's
        assert torch.equal(got[name], full[name]) != moved, name


def test_half_grads_takes_float16_only(monkeypatch):
    """HALF_GRADS names float16 or nothing: bfloat16 (8 bits, fewer than the dK products take)
    is refused by the backward before its kernels run."""
    from kernels.titans import chunk_bwd
    monkeypatch.setattr(chunk, "SPLIT_BACKWARD", True)
    monkeypatch.setattr(chunk_bwd, "HALF_GRADS", "bfloat16")
    x, st, _ = inputs(1, 20, 1, 16)
    q = x["q"].clone().requires_grad_()
    o = chunk_titans_linear(*(q if n == "q" else x[n] for n in NAMES), **st)[0]
    with pytest.raises(ValueError, match="HALF_GRADS must name 'float16' or None per dtype, "
                                         "got 'bfloat16' for torch.float32"):
        o.sum().backward()
