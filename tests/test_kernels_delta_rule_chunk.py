"""chunk_delta_rule (Triton, through the interpreter) against the float64 recurrence.

float32 bound 1e-5: the kernel's dots are exact float32 products ("ieee") and its sums run over
at most a few hundred terms of O(1) values, so its error is ~1e-7 (measured 2e-7 to 4e-7);
1e-5 is the issue's bar and 30x above what it shows, and any wrong term is >= 1e-3.
"""

import pytest
import torch
import torch.nn.functional as F

from harness.check.engine import rel_error
from kernels.delta_rule import chunk_delta_rule
from references.delta_rule import naive_recurrent_delta_rule

f32, f64 = torch.float32, torch.float64


def run_both(q, k, v, beta, h0=None, cu=None, scale=None, l2=False):
    """Outputs and gradients of the kernel (inputs' dtype) and of the float64 reference."""
    out = {}
    for name, fn, dt in (("kernel", chunk_delta_rule, q.dtype), ("ref", naive_recurrent_delta_rule, f64)):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v, beta)]
        s0 = None if h0 is None else h0.detach().to(f32 if dt != f64 else f64).requires_grad_()
        o, ht = fn(*xs, scale=scale, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                   use_qk_l2norm_in_kernel=l2)
        gen = torch.Generator().manual_seed(1)
        do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
        ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
        grads = [x.grad for x in xs] + ([s0.grad] if s0 is not None else [])
        out[name] = [o, ht] + grads
    return out["kernel"], out["ref"]


def inputs(B, T, H, K, V, dtype=f32, unit=True):
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    if unit:
        k = F.normalize(k, dim=-1)
    return [x.to(dtype) for x in (q, k, torch.randn(B, T, H, V), torch.rand(B, T, H))]


# K = 130 and 256: the state walks hold S in three and four blocks of 64 rows
@pytest.mark.parametrize("B, T, H, K, V", [(1, 1, 1, 16, 16), (2, 70, 2, 20, 12), (1, 130, 1, 32, 48),
                                           (1, 70, 1, 130, 12), (1, 40, 1, 256, 8)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_reference(B, T, H, K, V, with_h0):
    q, k, v, beta = inputs(B, T, H, K, V)
    h0 = torch.randn(B, H, K, V) if with_h0 else None
    got, ref = run_both(q, k, v, beta, h0, scale=0.7)
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], got, ref):
        assert rel_error(x, r) < 1e-5, (name, rel_error(x, r))


def test_varlen_l2norm_and_empty_sequences():
    cu = torch.tensor([0, 0, 1, 64, 64, 100])
    q, k, v, beta = inputs(1, 100, 2, 16, 16, unit=False)
    got, ref = run_both(q, k, v, beta, torch.randn(5, 2, 16, 16), cu=cu, l2=True)
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], got, ref):
        assert rel_error(x, r) < 1e-5, (name, rel_error(x, r))


def test_triangular_inverse_stays_accurate_near_singular():
    # beta -> 1 and nearly parallel keys: the entries of A approach 1, the regime where a solve
    # by powers of A blows up (peers have shipped entries past 1e10); the true inverse is
    # bounded and so must ours be.
    T, K = 128, 16
    base = torch.randn(K)
    k = F.normalize(base + 1e-3 * torch.randn(1, T, 1, K), dim=-1)
    q, v = torch.randn(1, T, 1, K), torch.randn(1, T, 1, K)
    beta = torch.full((1, T, 1), 0.999)
    got, ref = run_both(q, k, v, beta)
    assert all(torch.isfinite(x).all() for x in got)
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta"], got, ref):
        assert rel_error(x, r) < 1e-4, (name, rel_error(x, r))


def test_float16_within_three_times_the_reference_in_float16():
    q, k, v, beta = inputs(1, 70, 2, 16, 16, dtype=torch.float16)
    got, ref = run_both(q, k, v, beta)
    # the reference itself in float16 (state in float32), against the same float64 truth
    o16, ht16 = naive_recurrent_delta_rule(q, k, v, beta, output_final_state=True)
    assert rel_error(got[0], ref[0]) <= 3 * rel_error(o16, ref[0]) + 1e-3
    assert rel_error(got[1], ref[1]) <= 3 * rel_error(ht16, ref[1]) + 1e-3
    # every gradient: a few float16 ulps (2^-11 = 4.9e-4) of error, measured 5e-4 to 7e-4
    for name, x, r in zip(["dq", "dk", "dv", "dbeta"], got[2:], ref[2:]):
        assert rel_error(x, r) < 2e-3, (name, rel_error(x, r))


def test_per_channel_beta_goes_to_the_recurrent_kernel():
    q, k, v, _ = inputs(1, 20, 1, 8, 8)
    beta = torch.rand(1, 20, 1, 8)
    o, _ = chunk_delta_rule(q, k, v, beta)
    o_ref, _ = naive_recurrent_delta_rule(q.double(), k.double(), v.double(), beta.double())
    assert rel_error(o, o_ref) < 1e-5


@pytest.mark.parametrize("cu", [None, [0, 1, 1, 2]])
def test_one_token_sequences_go_to_the_recurrent_kernel(monkeypatch, cu):
    """Decoding (every sequence one token) takes the recurrent kernel: the chunked form would
    round v' to the inputs' dtype before dq = scale (dO . v') k, a single dot product."""
    import kernels.delta_rule.chunk as chunk_mod
    calls = []
    real = chunk_mod.fused_recurrent_delta_rule
    monkeypatch.setattr(chunk_mod, "fused_recurrent_delta_rule",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    B, T = (2, 1) if cu is None else (1, 2)
    cu = None if cu is None else torch.tensor(cu)
    q, k, v, beta = inputs(B, T, 2, 16, 16)
    got, ref = run_both(q, k, v, beta, torch.randn(B if cu is None else 3, 2, 16, 16), cu=cu)
    assert calls, "one-token sequences should be handed to fused_recurrent_delta_rule"
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], got, ref):
        assert rel_error(x, r) < 1e-5, (name, rel_error(x, r))


def test_one_token_chunk_through_the_chunked_stages():
    """The chunked stages themselves on a chunk of one token (the autograd Function, past the
    hand-off): exact in float32 like every other chunk."""
    from kernels.delta_rule.chunk import ChunkDeltaRuleFunction
    q, k, v, beta = inputs(1, 1, 1, 16, 16)
    xs = [x.clone().requires_grad_() for x in (q, k, v, beta)]
    o, _ = ChunkDeltaRuleFunction.apply(*xs, 0.5, None, False, False, None)
    o.sum().backward()
    xr = [x.double().requires_grad_() for x in (q, k, v, beta)]
    o_ref, _ = naive_recurrent_delta_rule(*xr, scale=0.5)
    o_ref.sum().backward()
    assert rel_error(o, o_ref) < 1e-5
    for x, r in zip(xs, xr):
        assert rel_error(x.grad, r.grad) < 1e-5


def test_rejects_head_dims_over_256():
    q, k, v, beta = inputs(1, 4, 1, 300, 8)
    with pytest.raises(ValueError, match="K and V must be <= 256, got K=300"):
        chunk_delta_rule(q, k, v, beta)


@pytest.mark.parametrize("B, T, H, K, V, cu", [
    (1, 70, 2, 20, 12, None), (2, 64, 1, 32, 48, None), (1, 100, 2, 16, 16, [0, 0, 1, 64, 64, 100])])
def test_fused_wy_forward_equals_the_three_stages(B, T, H, K, V, cu):
    # wy_fwd (A and its inverse in registers) against kkt_fwd -> solve_tril -> recompute_w_u_fwd:
    # the same float32 algorithm (same block substitution), so they agree to rounding (~1e-7),
    # including the ragged last chunk and varlen with empty sequences.
    from kernels.common.solve_tril import solve_tril
    from kernels.common.utils import chunk_layout
    from kernels.delta_rule.wy import kkt_fwd, recompute_w_u_fwd, wy_fwd

    cu = None if cu is None else torch.tensor(cu)
    _, k, v, beta = inputs(B, T, H, K, V)
    _, NT, ci, _ = chunk_layout(B, T, cu, 64)
    Ai, w, u = wy_fwd(k, v, beta, cu, ci, NT, 64)
    Ai3 = solve_tril(kkt_fwd(k, beta, cu, ci, NT, 64), cu, ci)
    w3, u3 = recompute_w_u_fwd(k, v, beta, Ai3, cu, ci, NT, 64)
    for got, want in ((Ai, Ai3), (w, w3), (u, u3)):
        assert rel_error(got, want) < 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_both_wy_forwards_through_the_whole_kernel(monkeypatch, fused):
    # FUSED_WY_FWD (the default, wy_fwd) and the three-kernel path (kkt_fwd, solve_tril,
    # recompute_w_u_fwd): outputs and every gradient against the float64 recurrence,
    # near-singular chunk included (bound as above).
    import kernels.delta_rule.chunk as chunk_mod

    monkeypatch.setattr(chunk_mod, "FUSED_WY_FWD", fused)
    K = 16
    k = F.normalize(torch.randn(K) + 1e-3 * torch.randn(1, 70, 2, K), dim=-1)
    q, v = torch.randn(1, 70, 2, K), torch.randn(1, 70, 2, 12)
    beta = torch.full((1, 70, 2), 0.999)
    got, ref = run_both(q, k, v, beta, torch.randn(1, 2, K, 12), scale=0.7)
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], got, ref):
        assert rel_error(x, r) < 1e-4, (name, rel_error(x, r))


@pytest.mark.parametrize("mode, dk32", [("forward", True), ("inputs", True), ("forward", False),
                                        ("inputs", False)])
def test_backward_precision_switches(monkeypatch, mode, dk32):
    """BWD_RECOMPUTE and DK_PARTIAL_FLOAT32 forced for every dtype (("inputs", False) is
    bfloat16's default, which the interpreter cannot run: float16 stands in for it): float32
    inputs get exact gradients either way (the same arithmetic); float16 gradients stay within
    the float16 bound of the test above (measured: 5.7e-4 to 7.3e-4 with float16's defaults;
    5.8e-4 to 7.4e-4 with "inputs", where the backward's u, Ai and walk products are rounded to
    float16 as fla's are; dk 7.6e-4 with its partial in float16; torch.manual_seed(0) before
    the inputs)."""
    import kernels.delta_rule.chunk as chunk_mod

    monkeypatch.setattr(chunk_mod, "SAVE_STATES", False)  # the backward's recompute is under test
    monkeypatch.setattr(chunk_mod, "BWD_RECOMPUTE", mode)
    monkeypatch.setattr(chunk_mod, "DK_PARTIAL_FLOAT32", dk32)
    q, k, v, beta = inputs(2, 70, 2, 20, 12)
    got, ref = run_both(q, k, v, beta, torch.randn(2, 2, 20, 12), scale=0.7)
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], got, ref):
        assert rel_error(x, r) < 1e-5, (name, rel_error(x, r))
    q, k, v, beta = inputs(1, 70, 2, 16, 16, dtype=torch.float16)
    got, ref = run_both(q, k, v, beta)
    for name, x, r in zip(["dq", "dk", "dv", "dbeta"], got[2:], ref[2:]):
        assert rel_error(x, r) < 2e-3, (name, rel_error(x, r))


@pytest.mark.parametrize("save", [True, False])
def test_unknown_backward_recompute_mode_is_refused(monkeypatch, save):
    # refused whether or not the backward recomputes (a typo is never silently ignored)
    import kernels.delta_rule.chunk as chunk_mod

    monkeypatch.setattr(chunk_mod, "SAVE_STATES", save)
    monkeypatch.setattr(chunk_mod, "BWD_RECOMPUTE", "fast")
    q, k, v, beta = (x.requires_grad_() for x in inputs(1, 8, 1, 16, 16))
    o, _ = chunk_delta_rule(q, k, v, beta)
    with pytest.raises(ValueError, match="BWD_RECOMPUTE: expected 'forward' or 'inputs', got 'fast'"):
        o.sum().backward()


@pytest.mark.parametrize("dtype, bound", [(f32, 1e-5), (torch.float16, 2e-3)])
def test_saved_states_skip_the_backward_recompute(monkeypatch, dtype, bound):
    """SAVE_STATES (the default): the backward uses the forward's w, h, v' and launches neither
    the w, u recompute nor a forward state walk (both replaced here by functions that fail);
    gradients within the bounds above (float32: the test above's 1e-5; float16: the 2e-3 of
    test_backward_precision_switches), and in float32 equal to the recomputing backward's up to
    float32 roundings (same arithmetic, same kernels: measured 0 here)."""
    import kernels.delta_rule.chunk as chunk_mod

    torch.manual_seed(0)
    q, k, v, beta = inputs(2, 70, 2, 20, 12, dtype=dtype)
    h0 = torch.randn(2, 2, 20, 12)
    monkeypatch.setattr(chunk_mod, "SAVE_STATES", False)
    recomputed, _ = run_both(q, k, v, beta, h0, scale=0.7)

    def refuse(*args, **kwargs):
        raise AssertionError("the backward recomputed a saved stage")
    monkeypatch.setattr(chunk_mod, "SAVE_STATES", True)
    forward_h = chunk_mod.chunk_fwd_h
    calls = []
    def walk_once(*args, **kwargs):  # the forward's walk runs once, the backward's never
        calls.append(1)
        return forward_h(*args, **kwargs)
    monkeypatch.setattr(chunk_mod, "chunk_fwd_h", walk_once)
    monkeypatch.setattr(chunk_mod, "recompute_w_u_fwd", refuse)
    got, ref = run_both(q, k, v, beta, h0, scale=0.7)
    assert len(calls) == 1
    for name, x, r, x0 in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], got, ref, recomputed):
        assert rel_error(x, r) < bound, (name, rel_error(x, r))
        if dtype == f32:
            assert rel_error(x, x0) < 1e-6, (name, rel_error(x, x0))


def test_final_state_keeps_u_v_and_state_unrounded_in_half_precision():
    # The state walk takes u in float32 and multiplies with hi + lo halves of S and v'
    # (kernels.common.utils.dot_split) instead of rounding them to the inputs' dtype. Rounded,
    # they cost about one float16 ulp (2^-11 = 4.9e-4) of the final state: measured 5.4e-4 here
    # with all three rounded, 3.9e-4 with u still rounded, 3.1e-4 now (what w, stored in
    # float16, leaves). In bfloat16 that ulp is 2^-8, the harness's floor (3.9e-3) for a final
    # state: the references keep the state in float32 (error ~2e-7) and give no room.
    q, k, v, beta = inputs(1, 128, 2, 32, 32, dtype=torch.float16)
    got, ref = run_both(q, k, v, beta, torch.randn(1, 2, 32, 32))
    assert rel_error(got[1], ref[1]) < 3.6e-4


@pytest.mark.parametrize("mixed, bound", [("tf32", 4e-4), ("round", 6e-4)])
def test_forward_walk_modes_of_bfloat16(monkeypatch, mixed, bound):
    # bfloat16's walk modes (chunk_state.fwd_mixed: "tf32" for heads of <= 64 keys, "round"
    # above), forced in float16 (the interpreter has no bfloat16). The interpreter multiplies
    # "tf32" operands in full float32 (TF32's rounding is the device's), so this checks the
    # path, not its rounding: final state 3.1e-4 as with the split (test above); rounded to
    # float16, 4.8e-4 (one float16 ulp is 4.9e-4); a wrong term would be ~1.
    import kernels.common.chunk_state as cs

    monkeypatch.setattr(cs, "FWD_MIXED", mixed)
    q, k, v, beta = inputs(1, 128, 2, 32, 32, dtype=torch.float16)
    got, ref = run_both(q, k, v, beta, torch.randn(1, 2, 32, 32))
    assert rel_error(got[1], ref[1]) < bound, (mixed, rel_error(got[1], ref[1]))


@pytest.mark.parametrize("grad, save", [(False, True), (True, True), (True, False)])
def test_forward_frees_what_no_later_stage_reads(monkeypatch, grad, save):
    """Each intermediate lives only as long as a stage reads it: without gradients Ai is gone
    before the state walk and w before the output stage (the inference forward's peak, which
    an Ai kept by mistake raised by 256 MiB at T = 32K on the H200); with them Ai is kept, and
    w too when SAVE_STATES. Weak references to what wy_fwd returned, looked at when each stage
    starts."""
    import weakref

    import kernels.delta_rule.chunk as chunk_mod

    monkeypatch.setattr(chunk_mod, "SAVE_STATES", save)
    refs, alive = {}, {}
    stages = {name: getattr(chunk_mod, name) for name in ("wy_fwd", "chunk_fwd_h", "chunk_fwd_o")}

    def wy(*args, **kwargs):
        Ai, w, u = stages["wy_fwd"](*args, **kwargs)
        refs.update(Ai=weakref.ref(Ai), w=weakref.ref(w))
        return Ai, w, u

    def watch(name):
        def stage(*args, **kwargs):
            if name not in alive:  # the forward's call (the backward's recompute comes later)
                alive[name] = {n: r() is not None for n, r in refs.items()}
            return stages[name](*args, **kwargs)
        return stage
    monkeypatch.setattr(chunk_mod, "wy_fwd", wy)
    monkeypatch.setattr(chunk_mod, "chunk_fwd_h", watch("chunk_fwd_h"))
    monkeypatch.setattr(chunk_mod, "chunk_fwd_o", watch("chunk_fwd_o"))
    q, k, v, beta = (x.requires_grad_(grad) for x in inputs(1, 70, 1, 16, 16))
    with torch.set_grad_enabled(grad):
        chunk_delta_rule(q, k, v, beta)
    assert alive == {"chunk_fwd_h": {"Ai": grad, "w": True},
                     "chunk_fwd_o": {"Ai": grad, "w": grad and save}}


# K = 130: the walk holds S in three blocks, and the fused output sums Q K^T over them
@pytest.mark.parametrize("B, T, H, K, V, cu", [
    (2, 70, 2, 20, 12, None), (1, 70, 1, 130, 40, None), (1, 100, 2, 16, 16, [0, 0, 1, 64, 64, 100])])
@pytest.mark.parametrize("save", [True, False])
def test_fused_output_walk_matches_reference(monkeypatch, B, T, H, K, V, cu, save):
    """FUSED_OUTPUT: the walk writes O (chunk_state.chunk_fwd_h_o). Outputs and every gradient
    against the float64 recurrence (the 1e-5 above), with the states saved for the backward or
    recomputed by it, and O equal to the separate output stage's up to float32 summation order
    (measured: bitwise equal on the interpreter)."""
    import kernels.delta_rule.chunk as chunk_mod

    cu = None if cu is None else torch.tensor(cu)
    N = B if cu is None else len(cu) - 1
    q, k, v, beta = inputs(B, T, H, K, V, unit=cu is None)
    h0 = torch.randn(N, H, K, V)
    monkeypatch.setattr(chunk_mod, "SAVE_STATES", save)
    monkeypatch.setattr(chunk_mod, "FUSED_OUTPUT", False)
    separate = chunk_delta_rule(q, k, v, beta, 0.7, h0, True, cu is not None, cu)
    monkeypatch.setattr(chunk_mod, "FUSED_OUTPUT", True)
    monkeypatch.setattr(chunk_mod, "chunk_fwd_o", None)  # never called
    got, ref = run_both(q, k, v, beta, h0, cu=cu, scale=0.7, l2=cu is not None)
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], got, ref):
        assert rel_error(x, r) < 1e-5, (name, rel_error(x, r))
    assert rel_error(got[0], separate[0]) < 1e-6
    assert rel_error(got[1], separate[1]) < 1e-6


def test_fused_output_walk_in_half_precision_and_inference(monkeypatch):
    """float16, the same roundings as the separate stage (S, v' and tril(Q K^T) rounded to
    float16 for the output's products): O agrees with it to float32 summation order, below
    half a float16 ulp (2.4e-4; measured 0). Without gradients the walk stores neither h
    nor v' (nothing reads them)."""
    import kernels.delta_rule.chunk as chunk_mod
    from kernels.common import chunk_state

    q, k, v, beta = inputs(1, 128, 2, 32, 32, dtype=torch.float16)
    h0 = torch.randn(1, 2, 32, 32)
    monkeypatch.setattr(chunk_mod, "FUSED_OUTPUT", False)
    separate = chunk_delta_rule(q, k, v, beta, None, h0, True)
    stored = []

    def walk(*args, **kwargs):
        o, ht, h, v_new = chunk_state.chunk_fwd_h_o(*args, **kwargs)
        stored.append((h is not None, v_new is not None))
        return o, ht, h, v_new
    monkeypatch.setattr(chunk_mod, "FUSED_OUTPUT", True)
    monkeypatch.setattr(chunk_mod, "chunk_fwd_h_o", walk)
    with torch.no_grad():
        fused = chunk_delta_rule(q, k, v, beta, None, h0, True)
    assert stored == [(False, False)]
    assert fused[0].dtype == torch.float16
    assert rel_error(fused[0], separate[0]) < 2.4e-4, rel_error(fused[0], separate[0])
    assert rel_error(fused[1], separate[1]) < 1e-6
