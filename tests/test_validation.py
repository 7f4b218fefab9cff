"""Bad input gets a TypeError/ValueError naming the argument, the expected and the given value,
from every implementation (the references here; kernels share the same Operator.validate)."""

import pytest
import torch

from references.operators import DELTA_RULE, GLA, LOG_LINEAR, TITANS, TTT
from references.delta_rule import chunk_delta_rule_ref, naive_recurrent_delta_rule
from references.gla import naive_recurrent_gla

B, T, H, K, V = 2, 6, 2, 4, 3


def delta_args(**over):
    args = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                beta=torch.rand(B, T, H))
    args.update(over)
    return args


@pytest.mark.parametrize("fn", [naive_recurrent_delta_rule, chunk_delta_rule_ref])
@pytest.mark.parametrize("over, exc, words", [
    (dict(q=torch.randn(B, T, K)), ValueError, ["'q'", "[B, T, H, K]", "[2, 6, 4]"]),
    (dict(k=torch.randn(B, T + 1, H, K)), ValueError, ["'k'", "T=6", "[2, 7, 2, 4]"]),
    (dict(v=torch.randn(B, T, H + 1, V)), ValueError, ["'v'", "H=2", "[2, 6, 3, 3]"]),
    (dict(beta=torch.rand(B, T, H, V + 1)), ValueError, ["'beta'", "[B, T, H] with", "or [B, T, H, V]", "[2, 6, 2, 4]"]),
    (dict(q=torch.randint(0, 3, (B, T, H, K))), TypeError, ["'q'", "floating-point", "torch.int64"]),
    (dict(v=torch.randn(B, T, H, V, dtype=torch.float64)), TypeError, ["'v'", "float64", "float32"]),
    (dict(beta=torch.rand(B, T, H, device="meta")), ValueError, ["'beta'", "meta", "cpu"]),
    (dict(initial_state=torch.randn(B + 1, H, K, V)), ValueError, ["'initial_state'", "N=2", "[3, 2, 4, 3]"]),
    (dict(scale="0.5"), TypeError, ["'scale'", "'0.5'"]),
    (dict(use_qk_l2norm_in_kernel=1), TypeError, ["use_qk_l2norm_in_kernel", "bool"]),
])
def test_delta_rule_rejects(fn, over, exc, words):
    with pytest.raises(exc) as info:
        fn(**delta_args(**over))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("cu, words", [
    (torch.tensor([1, 3, 6]), ["start at 0", "got 1"]),
    (torch.tensor([0, 3, 5]), ["end at T=6", "got 5"]),
    (torch.tensor([0, 4, 3, 6]), ["non-decreasing", "4 then 3"]),
    (torch.tensor([0, 6], dtype=torch.float32), ["int64", "torch.float32"]),
    (torch.tensor([[0, 6]]), ["1-D", "[1, 2]"]),
])
def test_cu_seqlens_rejected(cu, words):
    args = {n: x[:1] for n, x in delta_args().items()}
    with pytest.raises((ValueError, TypeError)) as info:
        naive_recurrent_delta_rule(**args, cu_seqlens=cu)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_cu_seqlens_needs_batch_of_one():
    with pytest.raises(ValueError, match=r"B must be 1.*got B=2"):
        naive_recurrent_delta_rule(**delta_args(), cu_seqlens=torch.tensor([0, 6]))


def test_cu_seqlens_initial_state_rows_are_sequences():
    args = {n: x[:1] for n, x in delta_args().items()}
    with pytest.raises(ValueError, match=r"N=3 rows \(one per sequence in cu_seqlens\)"):
        naive_recurrent_delta_rule(**args, cu_seqlens=torch.tensor([0, 2, 2, 6]),
                                   initial_state=torch.randn(1, H, K, V))


def test_gla_gate_shape_and_reverse_type():
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    with pytest.raises(ValueError, match=r"'gv' must have shape \[B, T, H, V\]"):
        naive_recurrent_gla(q, k, v, gk=-torch.rand(B, T, H, K), gv=-torch.rand(B, T, H, K))
    with pytest.raises(TypeError, match="'reverse' must be a bool"):
        naive_recurrent_gla(q, k, v, reverse="yes")


def test_ttt_needs_k_equal_v():
    D = 4
    args = dict(q=torch.randn(1, T, H, D), k=torch.randn(1, T, H, D), v=torch.randn(1, T, H, D + 1),
                w=torch.ones(H, D), b=torch.zeros(H, D), eta=torch.rand(1, T, H, 1))
    with pytest.raises(ValueError, match=r"'v' must have shape \[B, T, H, D\] with .*D=4.*got \[1, 6, 2, 5\]"):
        TTT.validate(args)
    with pytest.raises(ValueError, match="'chunk_size' must be a positive int, got 0"):
        TTT.validate({**args, "v": torch.randn(1, T, H, D), "chunk_size": 0})


def test_titans_gate_shapes():
    D = 4
    args = dict(q=torch.randn(1, T, H, D), k=torch.randn(1, T, H, D), v=torch.randn(1, T, H, D),
                w=torch.ones(H, D), b=torch.zeros(H, D), theta=torch.rand(1, T, H),
                alpha=torch.rand(1, T, H, 1), eta=torch.rand(1, T, H))
    with pytest.raises(ValueError, match=r"'alpha' must have shape \[B, T, H\]"):
        TITANS.validate(args)


def test_log_linear_levels_and_groups():
    G, L = 1, 3  # T = 6 needs ceil(log2 6) + 1 = 4 levels
    args = dict(q=torch.randn(1, T, G, K), k=torch.randn(1, T, G, K), v=torch.randn(1, T, H, V),
                g=-torch.rand(1, T, H), level_scales=torch.rand(1, T, H, L))
    with pytest.raises(ValueError, match=r"L >= ceil\(log2 T\) \+ 1 = 4 .* got L=3"):
        LOG_LINEAR.validate(args)
    with pytest.raises(ValueError, match=r"H=2 must be a multiple of .* G=3"):
        LOG_LINEAR.validate({**args, "q": torch.randn(1, T, 3, K), "k": torch.randn(1, T, 3, K),
                             "level_scales": torch.rand(1, T, H, 4)})
    # with cu_seqlens the levels needed follow the longest sequence, not the packed T
    LOG_LINEAR.validate({**args, "cu_seqlens": torch.tensor([0, 3, 6])})
    with pytest.raises(ValueError, match="not supported yet"):
        LOG_LINEAR.validate({**args, "level_scales": torch.rand(1, T, H, 4), "output_final_state": True})


def test_required_inputs_and_tensor_types():
    with pytest.raises(TypeError, match="'beta' is required"):
        DELTA_RULE.validate({**delta_args(), "beta": None})
    with pytest.raises(TypeError, match="'q' must be a torch.Tensor, got list"):
        GLA.validate({"q": [1.0], "k": torch.randn(1), "v": torch.randn(1)})


@pytest.mark.parametrize("function", ["chunk_delta_rule", "fused_recurrent_delta_rule",
                                      "parallel_delta_rule"])
def test_a_kernel_on_cpu_tensors_without_the_interpreter_says_what_to_do(function):
    """Without TRITON_INTERPRET=1 at import, Triton would fail deep in the launch with "0 active
    drivers ([]). There should only be one."; each kernel raises first, saying what to do. A
    fresh process: this one runs the interpreter."""
    import os
    import subprocess
    import sys

    code = (f"import torch\nfrom kernels.delta_rule import {function}\n"
            f"q = torch.randn(1, 4, 1, 8)\n"
            f"try:\n    {function}(q, q, q, torch.rand(1, 4, 1))\n"
            f"except ValueError as exc:\n    print('ValueError:', exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"ValueError: {function}: the inputs are on the CPU" in done.stdout
    assert "TRITON_INTERPRET=1" in done.stdout and "CUDA" in done.stdout


@pytest.mark.parametrize("function", ["chunk_delta_rule", "fused_recurrent_delta_rule",
                                      "parallel_delta_rule"])
def test_a_kernel_refuses_a_dtype_it_does_not_declare(function):
    """The kernels are registered for float32, float16 and bfloat16: float64 is refused before
    any launch (fused_recurrent used to run it)."""
    import kernels.delta_rule as kdr

    q = torch.randn(1, 4, 1, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=f"{function}: q, k, v must be float32, float16 or "
                                        f"bfloat16, got torch.float64"):
        getattr(kdr, function)(q, q, q, torch.rand(1, 4, 1, dtype=torch.float64))


@pytest.mark.parametrize("fn, over, words", [
    (naive_recurrent_gla, dict(gk=0.5), ["'gk'", "[-inf, 0]", "0.5"]),
    (naive_recurrent_gla, dict(gv=1e-3), ["'gv'", "[-inf, 0]"]),
])
def test_references_refuse_values_outside_the_contract(fn, over, words):
    """A positive log gate is outside the contract (docs/operators.md): the references say so
    instead of computing a growing state. NaN is not refused (it propagates as the math does)."""
    args = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                gk=-torch.rand(B, T, H, K), gv=-torch.rand(B, T, H, V))
    for name, value in over.items():
        args[name] = args[name].clone()
        args[name][0, 2] = value
    with pytest.raises(ValueError) as info:
        fn(**args)
    for w in words:
        assert w in str(info.value)
    args["gk"][0, 1] = float("nan")
    args["gv"] = -torch.rand(B, T, H, V)
    args["gk"][0, 2] = -1.0
    assert torch.isnan(fn(**args)[0]).any()
