"""Our kernels compile for an H100/H200 (sm_90), checked on the CPU: the interpreter runs a
kernel's Python and cannot see what the compiler rejects. A helper that returned early from a
constexpr ``if`` ran on the interpreter and failed to compile on the GPU (the compiler also
typed the statements after the return: tl.dot of float32 and bfloat16); every bfloat16 kernel
is only ever compiled on the GPU otherwise.

Compiling takes minutes on 2 cores, so these tests are marked ``compile`` and left out of the
plain ``pytest`` run: CI runs them as a step of their own (``pytest -m compile``; docs/testing.md
has the budget). Each compiles per code path (``harness.compile.path_items``: its smallest
launch whole, its largest through LLVM IR, for the shared memory it needs) in
float32 and bfloat16 (bfloat16's own launches, with its modes: the recorder runs no kernel, so
the interpreter's lack of bfloat16 does not matter), the first tiling config; the registered
switches in bfloat16 alone (they are speed and memory forms, timed and checked in bfloat16 on
a GPU). `harness compile OP` compiles every dtype, float16 and the switches' float32 launches
included: 2026-12-06, the switches' float32 paths were 55 of 392 (TTT 18 of 78) and took the
compile step past its budget (docs/testing.md)."""

import importlib.util

import pytest

from harness.compile import Launch, compile_op
from harness.registry import implementations
from references.operators import OPERATORS

needs_nvidia = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                  reason="Triton's NVIDIA backend is not installed")

# Per operator with Triton kernels: the gpu suite's cases that between them take every code path
# of its kernels, and the kernels they must launch. The delta rule's: both states, K != V and
# not powers of two, 16-wide heads, l2norm with per-channel beta, varlen with empty and
# one-token sequences, one token, no states at K = V = 128, the largest head (256: the most
# shared memory; each launch is checked against sm_90's limit).
COVER = {
    "delta_rule": (
        ["basic", "kv-256", "kv-48x80", "l2norm-beta-v", "varlen-empty", "k16-tail-l2norm", "t1",
         "stateless"],
        {"wy_fwd_kernel", "kkt_fwd_kernel", "solve_tril_kernel", "recompute_w_u_fwd_kernel",
         "chunk_fwd_h_kernel", "chunk_fwd_o_kernel", "chunk_bwd_dv_local_kernel",
         "chunk_bwd_dh_kernel", "chunk_bwd_dqk_kernel", "wy_bwd_kernel", "l2norm_fwd_kernel",
         "l2norm_bwd_kernel", "fused_recurrent_delta_rule_fwd_kernel",
         "fused_recurrent_delta_rule_bwd_dh_kernel", "fused_recurrent_delta_rule_bwd_dqk_kernel",
         "parallel_delta_rule_fwd_kernel"}),
    # GLA's: the key gate, both gates over a tail chunk, reverse, varlen with empty sequences,
    # the largest head
    "gla": (
        ["basic", "tail-64+6", "reverse", "varlen-empty", "kv-256"],
        {"fused_recurrent_gla_fwd_kernel", "fused_recurrent_gla_bwd_dq_kernel",
         "fused_recurrent_gla_bwd_dh_kernel", "chunk_suffix_sum_kernel",
         "chunk_gla_fwd_gates_kernel", "chunk_gla_fwd_A_kernel",
         "chunk_gla_fwd_A_whole_kernel", "chunk_gla_bwd_intra_whole_kernel", "chunk_fwd_h_kernel",
         "chunk_fwd_o_kernel", "chunk_bwd_dh_kernel", "chunk_gla_bwd_dv_kernel",
         "chunk_gla_bwd_dA_kernel", "chunk_gla_bwd_intra_kernel", "chunk_gla_bwd_dqk_kernel",
         "fused_chunk_gla_fwd_kernel"}),
    # TTT's: D = 64 with a partial last mini-batch (T = 1024 has none: basic), D = 128, and the
    # largest mini-batch tiles, 64 x 128 (the most shared memory) and 64 x 64
    "ttt": (["partial-64+6", "partial-200", "cs64-d128", "cs64-d64"],
            {"fused_chunk_ttt_linear_fwd_kernel", "fused_chunk_ttt_linear_bwd_kernel",
             "chunk_ttt_linear_fwd_o_kernel", "chunk_ttt_linear_bwd_local_kernel",
             "chunk_ttt_linear_bwd_walk_kernel", "chunk_ttt_linear_bwd_dk_kernel"}),
    # log-linear attention's: tail chunks at K = V = 64 and 128, varlen with empty sequences,
    # K and V not powers of two, the largest head (256: the most shared memory)
    "log_linear_attn": (["tail-64+6", "tail-200", "varlen-empty", "kv-100x48", "kv-256"],
                        {"chunk_log_linear_attn_fwd_local_kernel",
                         "chunk_log_linear_attn_fwd_levels_kernel",
                         "chunk_log_linear_attn_bwd_local_kernel",
                         "chunk_log_linear_attn_bwd_dq_kernel",
                         "chunk_log_linear_attn_bwd_dkv_kernel",
                         "chunk_log_linear_attn_bwd_walks_kernel",
                         "chunk_log_linear_attn_bwd_gates_kernel"}),
    # Titans': a partial last mini-batch at D = 64 and 128, varlen, and the largest tiles: 64 x 64
    # (the one-walk backward's loads again, under its switch) and 64 x 128 (the split backward's
    # by blocks of the states). The last backward kernel's two forms (states whole or by rows,
    # its ROWS flag) are two code paths, each compiled at its largest launch: 16 x 128 whole
    # (partial-200, the most shared memory of the whole form) and 64 x 128 by rows. bfloat16's
    # forward without a backward at D = 64, chunk_size 16 replays the outputs per segment (in
    # the walk's launch under a registered switch). The backward walk by column pairs (D = 128)
    # under its registered switch.
    "titans": (["partial-64+6", "partial-200", "varlen-empty", "cs64-d64", "cs64-d128"],
               {"chunk_titans_linear_fwd_gates_kernel", "chunk_titans_linear_fwd_walk_kernel",
                "chunk_titans_linear_fwd_o_kernel", "chunk_titans_linear_fwd_segment_kernel",
                "chunk_titans_linear_fwd_overlap_kernel",
                "chunk_titans_linear_bwd_kernel",
                "chunk_titans_linear_bwd_local_kernel", "chunk_titans_linear_bwd_walk_kernel",
                "chunk_titans_linear_bwd_walk_cols_kernel",
                "chunk_titans_linear_bwd_gates_kernel"}),
}


# Code paths a kernel takes only under a flag that CPU tensors never set (the compile records
# them under a registered switch): (kernel, constexpr, value) that must be among the launches.
FLAGGED = {"titans": [("chunk_titans_linear_bwd_walk_cols_kernel", "PAIRED", True),
                      ("chunk_titans_linear_fwd_gates_kernel", "ZERO_FLAGS", True)]}


def test_every_operator_with_kernels_lists_its_covering_cases():
    with_kernels = {op for op in OPERATORS if any(i.kind == "triton" for i in implementations(op))}
    assert with_kernels == set(COVER)


@pytest.mark.compile
@needs_nvidia
@pytest.mark.parametrize("op", sorted(COVER))
def test_kernels_compile_for_sm90(op, tmp_path):
    cases, kernels = COVER[op]
    data = compile_op(op, arch=90, jobs=2, cases=cases, workdir=tmp_path, each_path=True,
                      dtypes=("float32", "bfloat16"), switch_dtypes=("bfloat16",))
    assert data["errors"] == []
    names = {Launch(**x).name for x in data["launches"]}
    # every kernel of the operator's implementations was launched, so was compiled
    assert kernels - names == set()
    for name, flag, value in FLAGGED.get(op, []):
        assert any(x["name"] == name and x["args"].get(flag) == ["const", value]
                   for x in data["launches"]), (name, flag, value)
    labels = [label for label, _, _ in data["compiled"]]
    assert any("[bfloat16," in label for label in labels) and any("[float32," in label for label in labels)
    failed = {label: err for label, err, _ in data["compiled"] if err is not None}
    assert failed == {}
