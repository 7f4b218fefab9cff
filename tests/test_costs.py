"""Cost models (harness/bench/costs.py): hand-computed numbers, agreement with the tensors a case
really holds, and how they grow with T."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.bench.measure import bench_case
from harness.cases import sample
from harness.bench.costs import ITEMSIZE, MODELS, cost, popcount_sum

OPS = ("delta_rule", "gla", "ttt", "titans", "log_linear_attn")


def dims(op, B, T, H, D):
    return bench_case(op, B, T, H, D).dims


def test_delta_rule_at_the_issue_shape_reads_and_writes_269_mb():
    # q, k, v + beta read, o written, bf16: (4 * 2*8192*16*128 + 2*8192*16) * 2 bytes
    c = cost("delta_rule", dims("delta_rule", 2, 8192, 16, 128), "bfloat16", "fwd")
    assert c.bytes == (4 * 2 * 8192 * 16 * 128 + 2 * 8192 * 16) * 2 == 268_959_744
    assert round(c.bytes / 1e6) == 269
    # per token and head: 6CK + 4CV + 2C^2/3 + 6KV = 49152 + 32768 + 8192/3 + 98304
    assert c.flops == pytest.approx(2 * 8192 * 16 * (180_224 + 8192 / 3), rel=1e-12)
    assert c.flops == pytest.approx(47_960_468_138.67, rel=1e-12)


@pytest.mark.parametrize("op, shape, dtype, flops, fwd_bytes", [
    # B=1 T=128 H=2 K=V=16: 2*128 * (2*64*16 + 2*64*16 + 4*16*16); (3K + V) in, V out, float32
    ("gla", (1, 128, 2, 16), "float32", 256 * 5120, 4 * 256 * 64 + 4 * 256 * 16),
    # B=1 T=32 H=1 D=8, C=16: 32 * (6*64 + 4*16*8); q,k,v,eta + w,b in, o out
    ("ttt", (1, 32, 1, 8), "float32", 32 * 896, 4 * (32 * 25 + 16) + 4 * 32 * 8),
    # 32 * (10*64 + 4*16*8 + 2*16*17); q,k,v,theta,alpha,eta + w,b in, o out
    ("titans", (1, 32, 1, 8), "float32", 32 * 1696, 4 * (32 * 27 + 16) + 4 * 32 * 8),
    # T=256 = 4 chunks with 0,1,1,2 levels: 256*(2*64*16*2 + 2*256) + 2*256*(4*64); L = 9
    ("log_linear_attn", (1, 256, 1, 16), "float32", 256 * 4608 + 512 * 256,
     4 * 256 * (2 * 16 + 16 + 1 + 9) + 4 * 256 * 16),
    # B=1 T=64 H=1 K=V=16 in bf16: 64*(6*64*16 + 4*64*16 + 2*64*64/3 + 6*256); q,k,v,beta,o
    ("delta_rule", (1, 64, 1, 16), "bfloat16", 64 * (10240 + 8192 / 3 + 1536),
     2 * 64 * (3 * 16 + 1) + 2 * 64 * 16),
])
def test_hand_computed(op, shape, dtype, flops, fwd_bytes):
    d = dims(op, *shape)
    fwd, bwd, both = (cost(op, d, dtype, m) for m in ("fwd", "bwd", "fwdbwd"))
    assert fwd.flops == pytest.approx(flops, rel=1e-12)
    assert fwd.bytes == fwd_bytes
    out = ITEMSIZE[dtype] * shape[0] * shape[1] * shape[2] * shape[3]  # o, and do
    inputs = fwd_bytes - out
    assert bwd.flops == pytest.approx(2 * flops, rel=1e-12)
    assert bwd.bytes == 2 * inputs + out  # inputs and do read, one gradient per input written
    assert both.flops == pytest.approx(3 * flops, rel=1e-12)
    assert both.bytes == fwd.bytes + bwd.bytes


def test_softmax_baseline_has_its_own_model():
    # causal half of QK^T and PV: B H T^2 (K + V) = 2 * 64^2 * 32
    c = cost("softmax_attention", dims("delta_rule", 1, 64, 2, 16), "float32", "fwd")
    assert c.flops == 2 * 64 * 64 * 32
    assert c.bytes == 4 * 4 * 64 * 2 * 16


def test_states_add_float32_reads_and_writes():
    d = dims("delta_rule", 2, 64, 3, 16)
    plain, with_states = (cost("delta_rule", d, "bfloat16", "fwd", states=s) for s in (False, True))
    assert with_states.bytes - plain.bytes == 2 * 4 * 2 * 3 * 16 * 16  # h0 read, hT written
    bwd = [cost("delta_rule", d, "bfloat16", "bwd", states=s) for s in (False, True)]
    assert bwd[1].bytes - bwd[0].bytes == 3 * 4 * 2 * 3 * 16 * 16  # h0, dhT read; dh0 written


@pytest.mark.parametrize("op, option", [(op, None) for op in OPS]
                         + [("delta_rule", "beta_per_channel"), ("gla", "gv")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bytes_are_the_tensors_a_case_holds(op, option, dtype):
    """Minimum bytes = every input tensor sample() draws + o, at the dtype's width; the state
    bytes = the initial states sample() draws (float32)."""
    case = bench_case(op, 2, 40, 2, 8)
    if option is not None:
        case = replace(case, options={**case.options, option: True})
    args = sample(case)
    op_decl = case.operator
    inputs = sum(args[i.name].numel() for i in op_decl.inputs
                 if args.get(i.name) is not None and not i.state)
    work = MODELS[op](case.dims, ITEMSIZE[dtype], case.options)
    out_numel = args["v"].numel()  # o has v's shape
    assert work.inputs == ITEMSIZE[dtype] * inputs
    assert work.output == ITEMSIZE[dtype] * out_numel
    if op_decl.has_state:
        stated = sample(replace(case, initial_state=True))
        state = sum(stated[i.name].numel() for i in op_decl.inputs if i.state)
        assert work.state == 4 * state


def test_popcount_sum_matches_its_definition():
    for C in (1, 4, 64):
        for T in list(range(0, 300)) + [4096, 5000]:
            assert popcount_sum(T, C) == sum(bin(t // C).count("1") for t in range(T)), (T, C)


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(OPS[:4]), mode=st.sampled_from(["fwd", "bwd", "fwdbwd"]),
       t1=st.integers(1, 5000), t2=st.integers(1, 5000), B=st.integers(1, 3),
       H=st.integers(1, 4), D=st.sampled_from([8, 16, 64, 128]))
def test_affine_in_T(op, mode, t1, t2, B, H, D):
    """f(T1 + T2) + f(0) = f(T1) + f(T2): cost grows linearly in T (LayerNorm weights are the
    only T-independent bytes)."""
    c = {T: cost(op, dims(op, B, T, H, D), "bfloat16", mode) for T in (0, t1, t2, t1 + t2)}
    assert c[t1 + t2].flops + c[0].flops == pytest.approx(c[t1].flops + c[t2].flops, rel=1e-12)
    assert c[t1 + t2].bytes + c[0].bytes == c[t1].bytes + c[t2].bytes
    assert c[t1 + t2].flops > c[t1].flops and c[t1 + t2].bytes > c[t1].bytes


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 100_000), dt=st.integers(1, 5000), D=st.sampled_from([16, 64, 128]))
def test_log_linear_grows_as_T_log_T(t, dt, D):
    """Monotone in T, and between the linear part and linear + 2KV T log2(T / C) levels."""
    a, b = (cost("log_linear_attn", dims("log_linear_attn", 1, T, 2, D), "bfloat16", "fwd")
            for T in (t, t + dt))
    assert b.flops > a.flops and b.bytes > a.bytes
    linear = 2 * t * (2 * 64 * D * 2 + 2 * D * D)
    levels = 2 * 2 * D * D * t * max(0.0, (-(-t // 64) - 1).bit_length())
    assert linear <= a.flops <= linear + levels


@pytest.mark.parametrize("args, message", [
    (("mamba", {}, "float32", "fwd"), "unknown operator 'mamba'"),
    (("gla", {}, "int8", "fwd"), "unknown dtype 'int8'"),
    (("gla", {}, "float32", "sideways"), "mode must be one of fwd, bwd, fwdbwd, got 'sideways'"),
])
def test_bad_arguments_say_what_was_expected(args, message):
    with pytest.raises(ValueError, match=message):
        cost(*args)
