"""The fused recurrent delta-rule kernels (and the shared l2norm kernels) against the float64
reference, through the Triton interpreter (conftest sets TRITON_INTERPRET=1).

Tolerances. float32: the kernel keeps S and dS in float32 and runs <= 37 sequential steps;
each step adds a few roundings of 6e-8 (unit roundoff) to well-scaled values (unit-norm keys,
beta in (0, 1)), so outputs, states and gradients land at ~1e-7 relative (measured 1e-7 to
4e-7). 1e-5 leaves 25x of room and still catches any wrong or missing term, which costs 1e-2
or more. float16: rounding the output and the inputs' gradients to float16 dominates; the
kernel must be within 3x of the reference run on the same float16 inputs (state in float32,
as the kernel) plus 1e-3, about two float16 ulps at 1.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels.common.l2norm as l2norm_mod
import kernels.delta_rule.fused_recurrent as fr
from harness.check.poison import poison_allocations
from kernels.common.l2norm import l2norm_bwd, l2norm_fwd
from kernels.delta_rule import fused_recurrent_delta_rule
from references.delta_rule import naive_recurrent_delta_rule

F32_TOL = 1e-5
F16_FACTOR, F16_FLOOR = 3.0, 1e-3
QUANTITIES = ("o", "final_state", "dq", "dk", "dv", "dbeta", "dinitial_state")
# the three sweeps: the forward, the backward's reverse (dS) and forward (dq, dk) sweeps
KERNELS = ("fused_recurrent_delta_rule_fwd_kernel", "fused_recurrent_delta_rule_bwd_dh_kernel",
           "fused_recurrent_delta_rule_bwd_dqk_kernel")


def rel(x, ref):
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm()).item()


def make_inputs(B, T, H, K, V, per_channel, h0, l2norm, cu=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    if not l2norm:  # the realistic domain: unit-norm queries and keys
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.sigmoid(torch.randn(B, T, H, *([V] if per_channel else []), generator=g))
    N = B if cu is None else cu.numel() - 1
    s0 = torch.randn(N, H, K, V, generator=g) if h0 else None
    return dict(q=q, k=k, v=v, beta=beta, initial_state=s0), N


def run(fn, inputs, dtype, douts, poison=False, **kw):
    """Outputs and input gradients of fn on inputs cast to dtype (the state to float32 at least)."""
    leaves = {n: None if x is None else
              x.to(torch.promote_types(dtype, torch.float32) if n == "initial_state" else dtype)
              .detach().requires_grad_() for n, x in inputs.items()}
    with poison_allocations(poison):
        o, ht = fn(**leaves, **kw)
        loss = (o.double() * douts["o"]).sum()
        if ht is not None:
            loss = loss + (ht.double() * douts["final_state"]).sum()
        loss.backward()
    got = {"o": o, "final_state": ht}
    got.update({f"d{n}": x.grad for n, x in leaves.items() if x is not None})
    return got


def errors(B, T, H, K, V, per_channel=False, h0=True, l2norm=False, scale=None, cu=None,
           output_final_state=True, dtype=torch.float32):
    inputs, N = make_inputs(B, T, H, K, V, per_channel, h0, l2norm, cu)
    # rounded to dtype, so the truth sees what the kernel sees (states are float32 anyway)
    inputs = {n: x if x is None or n == "initial_state" else x.to(dtype).float()
              for n, x in inputs.items()}
    g = torch.Generator().manual_seed(1)
    douts = {"o": torch.randn(B, T, H, V, generator=g, dtype=torch.float64),
             "final_state": torch.randn(N, H, K, V, generator=g, dtype=torch.float64)}
    kw = dict(scale=scale, output_final_state=output_final_state,
              use_qk_l2norm_in_kernel=l2norm, cu_seqlens=cu)
    truth = run(naive_recurrent_delta_rule, inputs, torch.float64, douts, **kw)
    got = run(fused_recurrent_delta_rule, inputs, dtype, douts, poison=True, **kw)
    if not output_final_state:
        assert got["final_state"] is None
    assert got["o"].dtype == dtype
    for n in ("q", "k", "v", "beta"):
        assert got[f"d{n}"].dtype == dtype, n
    if h0:
        assert got["dinitial_state"].dtype == torch.float32
    err = {n: rel(got[n], truth[n]) for n in QUANTITIES if truth.get(n) is not None}
    ref = None
    if dtype != torch.float32:
        same = run(naive_recurrent_delta_rule, inputs, dtype, douts, **kw)
        ref = {n: rel(same[n], truth[n]) for n in err}
    return err, ref


CASES = {
    # name: (B, T, H, K, V, per_channel, h0, l2norm, scale)
    "T37_K16_V16": (2, 37, 1, 16, 16, False, True, False, None),
    "T37_K20_V12_channel_l2": (1, 37, 2, 20, 12, True, False, True, 0.7),
    "T1_decode_step": (1, 1, 2, 16, 16, False, True, True, 0.7),
    "T1_no_state": (2, 1, 1, 20, 12, True, False, False, None),
    "T23_V40_two_value_tiles": (1, 23, 1, 16, 40, True, True, False, None),
    # per-token beta and l2norm with two value tiles: dq, dk summed by atomic adds, dbeta partials
    "T23_V40_token_beta_l2": (1, 23, 2, 16, 40, False, True, True, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(name):
    B, T, H, K, V, per_channel, h0, l2norm, scale = CASES[name]
    err, _ = errors(B, T, H, K, V, per_channel, h0, l2norm, scale)
    assert max(err.values()) < F32_TOL, err


@pytest.mark.parametrize("BV", [8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_float32_every_value_tile_the_gpu_autotunes(monkeypatch, BV, per_channel):
    # The interpreter runs the first config; a GPU may pick any. Each tiling of V = 40 (5 or 3
    # value tiles, the last partial) in all three sweeps: the atomic sums of dq and dk over the
    # tiles and per-token dbeta's slots.
    for n in KERNELS:
        tuner = getattr(fr, n).fn  # the heuristics wrap the autotuner
        cfg = next(c for c in tuner.configs + fr.SWEEP_CONFIGS if c.kwargs["BV"] == BV)
        monkeypatch.setattr(tuner, "configs", [cfg])
    err, _ = errors(1, 23, 2, 16, 40, per_channel, True, not per_channel, None)
    assert max(err.values()) < F32_TOL, err


@pytest.mark.parametrize("per_channel", [False, True])
def test_float32_after_autotuning_reran_every_sweep(monkeypatch, per_channel):
    # Autotuning runs each kernel several times per config on the same buffers, before the
    # chosen config's run: the atomic sums (dq, dk) and dbeta's slots must not keep those runs.
    # The GPU's timer is replaced by three runs of each config; the last config wins: BV 32 (two
    # value tiles of V = 40), after BV 8 and 16 wrote all five and three of dbeta's slots.
    runs = []

    def three_runs(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        runs.append(1)
        return [1.0 / len(runs)] * len(quantiles)

    for n in KERNELS:
        tuner = getattr(fr, n).fn
        monkeypatch.setattr(tuner, "configs", [c for c in fr.SWEEP_CONFIGS[::-1] if c.num_warps == 1])
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setitem(vars(tuner), "do_bench", three_runs)  # a cached_property
    err, _ = errors(1, 23, 2, 16, 40, per_channel, True, not per_channel, None)
    assert len(runs) == 3 * 3, runs  # three configs of each of the three kernels were timed
    assert max(err.values()) < F32_TOL, err


@pytest.mark.parametrize("per_channel,l2norm", [(False, True), (True, False)])
def test_float32_varlen_with_empty_and_single_token_sequences(per_channel, l2norm):
    cu = torch.tensor([0, 0, 1, 20, 37], dtype=torch.int64)
    err, _ = errors(1, 37, 2, 20, 12, per_channel, True, l2norm, 0.7, cu=cu)
    assert max(err.values()) < F32_TOL, err
    # an empty sequence still writes its final state (= its initial state) and d(initial_state)
    inputs, _ = make_inputs(1, 37, 2, 20, 12, per_channel, True, l2norm, cu)
    with poison_allocations():
        _, ht = fused_recurrent_delta_rule(**inputs, output_final_state=True, cu_seqlens=cu)
    torch.testing.assert_close(ht[0], inputs["initial_state"][0], rtol=0, atol=0)


def test_float32_without_final_state():
    err, _ = errors(1, 37, 1, 16, 16, True, True, False, None, output_final_state=False)
    assert max(err.values()) < F32_TOL, err


def test_float16_within_factor_of_same_dtype_reference():
    err, ref = errors(1, 37, 2, 16, 16, True, True, True, None, dtype=torch.float16)
    for n, e in err.items():
        assert e <= F16_FACTOR * ref[n] + F16_FLOOR, (n, e, ref[n])


class _Launches:
    """Counts the launches of a kernel (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def test_decoding_steps_match_one_call_with_one_launch_each(monkeypatch):
    inputs, _ = make_inputs(1, 9, 2, 20, 12, False, True, True)
    full, ht_full = fused_recurrent_delta_rule(**inputs, output_final_state=True,
                                               use_qk_l2norm_in_kernel=True)
    counters = {n: _Launches(getattr(fr, n)) for n in KERNELS}
    for n, c in counters.items():
        monkeypatch.setattr(fr, n, c)
    for n in ("l2norm_fwd_kernel", "l2norm_bwd_kernel"):
        counters[n] = _Launches(getattr(l2norm_mod, n))
        monkeypatch.setattr(l2norm_mod, n, counters[n])
    state, outs = inputs["initial_state"], []
    for t in range(9):
        step = {n: inputs[n][:, t:t + 1] for n in ("q", "k", "v", "beta")}
        o, state = fused_recurrent_delta_rule(**step, initial_state=state, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
        outs.append(o)
    assert {n: c.count for n, c in counters.items()} == {n: 9 if n == KERNELS[0] else 0 for n in counters}
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, ht_full, rtol=1e-6, atol=1e-6)


def test_rejects_what_the_contract_rejects():
    inputs, _ = make_inputs(1, 4, 1, 8, 8, False, False, False)
    with pytest.raises(ValueError, match="beta"):
        fused_recurrent_delta_rule(**{**inputs, "beta": inputs["beta"][..., None]})
    big = {n: torch.zeros(1, 1, 1, 300) for n in ("q", "k")}
    with pytest.raises(ValueError, match="K=300"):
        fused_recurrent_delta_rule(**big, v=torch.zeros(1, 1, 1, 4), beta=torch.zeros(1, 1, 1))


@pytest.mark.parametrize("D", [5, 20, 64, 256])
def test_l2norm_kernels_match_f_normalize(D):
    x = torch.randn(3, 7, 2, D, dtype=torch.float64)
    x[0, 0, 0] = 0  # the zero vector: y = 0, dx = dy / eps (as F.normalize)
    x[1, 2, 1] *= 1e-3
    dy = torch.randn_like(x)
    with poison_allocations():
        y, rstd = l2norm_fwd(x.float())
        dx = l2norm_bwd(y, rstd, dy.float())
    assert y.dtype == dx.dtype == torch.float32 and rstd.shape == x.shape[:-1]
    xr = x.clone().requires_grad_()
    yr = F.normalize(xr, dim=-1)
    yr.backward(dy)
    assert rel(y, yr) < 1e-6 and rel(dx, xr.grad) < 1e-6
    assert rel(dx[1:], xr.grad[1:]) < 1e-6  # rows of ordinary size, without the 1e12 zero row
