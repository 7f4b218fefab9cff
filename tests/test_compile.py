"""Our kernels compile for an H100 (sm_90), checked on the CPU: the interpreter runs a kernel's
Python and cannot see what the compiler rejects. A helper that returned early from a constexpr
``if`` ran on the interpreter and failed to compile on the GPU (the compiler also typed the
statements after the return: tl.dot of float32 and bfloat16); every bfloat16 kernel is only
ever compiled on the GPU otherwise."""

import importlib.util

import pytest

from harness.compile import Launch, compile_op

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="Triton's NVIDIA backend is not installed")

# The gpu suite's cases that between them take every code path of the three kernels: both
# states, K != V and not powers of two, 16-wide heads, l2norm with per-channel beta, varlen
# with empty and one-token sequences, one token, no states at K = V = 128, the largest head
# (256: the most shared memory; each launch is checked against the H100's limit).
CASES = ["basic", "kv-256", "kv-48x80", "l2norm-beta-v", "varlen-empty", "k16-tail-l2norm", "t1",
         "stateless"]
KERNELS = {
    "wy_fwd_kernel", "kkt_fwd_kernel", "solve_tril_kernel", "recompute_w_u_fwd_kernel",
    "chunk_fwd_h_kernel", "chunk_fwd_o_kernel", "chunk_bwd_dv_local_kernel", "chunk_bwd_dh_kernel",
    "chunk_bwd_dqk_kernel", "wy_bwd_kernel", "l2norm_fwd_kernel", "l2norm_bwd_kernel",
    "fused_recurrent_delta_rule_fwd_kernel", "fused_recurrent_delta_rule_bwd_dh_kernel",
    "fused_recurrent_delta_rule_bwd_dqk_kernel", "parallel_delta_rule_fwd_kernel",
}


def test_delta_rule_kernels_compile_for_sm90(tmp_path):
    data = compile_op("delta_rule", arch=90, jobs=2, cases=CASES, workdir=tmp_path)
    assert data["errors"] == []
    names = {Launch(**x).name for x in data["launches"]}
    # every kernel of the three implementations was launched, so was compiled
    assert KERNELS - names == set()
    labels = [label for label, _, _ in data["compiled"]]
    assert any("[bfloat16," in label for label in labels) and any("[float32," in label for label in labels)
    failed = {label: err for label, err, _ in data["compiled"] if err is not None}
    assert failed == {}
