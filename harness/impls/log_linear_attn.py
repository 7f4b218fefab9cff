"""Log-linear attention's implementations: the two references, our chunk kernel (Triton, forward
and backward), fla-core 0.6.0's kernel and the softmax baseline.

fla's ``chunk_log_linear_attn`` takes our arguments unchanged (grouped q/k, ``scale=1.0``
default, the same Fenwick levels as docs/operators.md); its kernel needs K % 64 == 0, V a power
of two, and sequences under 2^17 tokens.
"""

from __future__ import annotations

from harness.impls.common import KERNEL_DTYPES, fla, references, sdpa, triton_available
from harness.implementation import Implementation
from references.operators import LOG_LINEAR

FLA_BLOCK_K = 64
FLA_MAX_T = 2**17


def _fla_supports(case) -> str | None:
    K, V = case.dims["K"], case.dims["V"]
    if K % FLA_BLOCK_K:
        return f"K={K}: fla's chunk_log_linear_attn needs K % {FLA_BLOCK_K} == 0"
    if V & (V - 1):
        return f"V={V}: fla's chunk_log_linear_attn needs a power of two"
    longest = max(case.seqlens) if case.seqlens else case.dims["T"]
    if longest > FLA_MAX_T:
        return f"sequences longer than {FLA_MAX_T} tokens"
    return None


def _ours_supports(case) -> str | None:
    from kernels.log_linear_attn.chunk import MAX_DIM

    K, V = case.dims["K"], case.dims["V"]
    if max(K, V) > MAX_DIM:
        return f"our log-linear kernel takes K, V <= {MAX_DIM}, got K={K}, V={V}"
    return None


# chunk's switches (kernels/log_linear_attn/chunk.py; their timings there): the forward's walk
# forming each chunk's own state instead of reading a float32 buffer of every chunk's
# (WALK_STATES: less memory, a product a chunk more); the forward in one kernel, the walk
# forming each chunk's own output too, also when a gradient is needed (WALK_LOCAL True; by
# default only without one: no float32 buffer), or in two kernels also without one
# (WALK_LOCAL False: faster, the float32 buffers); the backward's dq walk
# reading that buffer instead (BWD_WALK_STATES off); the backward's two walks one after the
# other (WALKS_TOGETHER off).
# Its forward without gradients is another kernel path (WALK_LOCAL's default): inference_path
# has the check run it too.
# Registered switches are compiled by the compile tests and compared by
# tools/switch_compare.py.
_STATES_IN_WALK = {"what": "forward's chunk states formed in its walk",
                   "set": {"kernels.log_linear_attn.chunk.WALK_STATES": True}}
_LOCAL_IN_WALK = {"what": "forward in one kernel with gradients too",
                  "set": {"kernels.log_linear_attn.chunk.WALK_LOCAL": True}}
_LOCAL_APART = {"what": "forward in two kernels without gradients too",
                "set": {"kernels.log_linear_attn.chunk.WALK_LOCAL": False}}
_BWD_STATES_BUFFER = {"what": "backward's chunk states from a float32 buffer",
                      "set": {"kernels.log_linear_attn.chunk.BWD_WALK_STATES": False}}
_WALKS_APART = {"what": "backward's walks in two launches",
                 "set": {"kernels.log_linear_attn.chunk.WALKS_TOGETHER": False}}

IMPLEMENTATIONS = [
    *references(LOG_LINEAR),
    Implementation(
        op="log_linear_attn", name="chunk", kind="triton",
        target="kernels.log_linear_attn:chunk_log_linear_attn", dtypes=KERNEL_DTYPES,
        description="chunk's own pairs in parallel, Fenwick level states walked forward and "
        "in reverse (Triton)", available=triton_available, supports=_ours_supports,
        inference_path=True,
        switches=(_STATES_IN_WALK, _LOCAL_IN_WALK, _LOCAL_APART, _BWD_STATES_BUFFER,
                  _WALKS_APART)),
    fla("log_linear_attn", "fla_chunk", "fla.ops.log_linear_attn:chunk_log_linear_attn",
        KERNEL_DTYPES, supports=_fla_supports),
    sdpa("log_linear_attn"),
]
