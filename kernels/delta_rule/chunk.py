"""Delta rule, chunked form (docs/operators.md section 1): chunks of BT = 64 tokens, matrix products
inside a chunk, one sequential walk over chunks for the state.

Forward, a chain of shared stages:

    A  = tril(diag(beta) K K^T, -1);  Ai = (I + A)^{-1}          # wy.wy_fwd: one kernel
    w  = Ai diag(beta) K;  u = Ai diag(beta) V                   # (FUSED_WY_FWD = False:
                                            # wy.kkt_fwd, common.solve_tril, wy.recompute_w_u_fwd)
    h[n], v' = u - w h[n], S_{n+1} = h[n] + K^T v'               # common.chunk_state.chunk_fwd_h
    O  = (scale Q) h[n] + tril((scale Q) K^T) v'                 # common.chunk_output.chunk_fwd_o
                                 # (FUSED_OUTPUT: in the walk, common.chunk_state.chunk_fwd_h_o)

Backward, the same stages in reverse (each kernel's docstring has its equations): recompute
w, u (wy.recompute_w_u_fwd), h and v' from the saved Ai; dv' from the outputs inside each
chunk; a reverse walk over chunks for d(state) and the full dv'; dq, dk, dw per chunk; then
back through the WY transform for the rest of dk, and dv, dbeta. Saved for the backward: q, k,
v, beta, Ai, initial_state, and with SAVE_STATES (the default) the forward's w, h and v' too, so
that the backward recomputes nothing (see SAVE_STATES for what that costs and saves).

Per-channel beta ([B,T,H,V]) gives every value channel its own triangular system, V of them
per chunk; that form is the recurrent kernel's, so this function hands it to
``fused_recurrent_delta_rule`` (same results, same gradients). So are calls whose sequences
are all one token long (decoding; see ``_one_token_each``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from references.operators import DELTA_RULE
from kernels.common.chunk_output import chunk_bwd_dqk, chunk_bwd_dv_local, chunk_fwd_o
from kernels.common.chunk_state import chunk_bwd_dh, chunk_fwd_h, chunk_fwd_h_o
from kernels.common.l2norm import l2norm_bwd, l2norm_fwd
from kernels.common.solve_tril import solve_tril
from kernels.common.utils import check_launchable, chunk_layout
from kernels.delta_rule.fused_recurrent import fused_recurrent_delta_rule
from kernels.delta_rule.wy import kkt_fwd, recompute_w_u_fwd, wy_bwd, wy_fwd

__all__ = ["chunk_delta_rule", "chunk_delta_rule_fwd", "chunk_delta_rule_bwd"]

BT = 64  # chunk size: a tiling choice, never a change of result
# wy.wy_fwd does the first three stages in one kernel with A in registers (A never stored).
# On the H100 (B=2 H=16 K=V=128 bf16) it took the forward from 0.83 to 0.65 ms at T=8K and
# 3.16 to 2.47 ms at 32K, same errors; False runs kkt_fwd, solve_tril, recompute_w_u_fwd.
# Only wy_fwd keeps a non-finite k, v or beta out of the chunk's earlier rows (utils.finite_part);
# with False a NaN at token t also turns the outputs of t's chunk before t NaN.
FUSED_WY_FWD = True
# Without SAVE_STATES the backward recomputes w, u, h and v' (to dq, dk, dw and dv').
# "inputs": in the inputs' dtype (u rounded, Ai rounded, S and v' rounded into the walk's
# products; fla's arithmetic).
# "forward": with the forward's arithmetic (u float32, Ai as hi + lo, S and v' per
# FWD_MIXED_BY_DTYPE), one product more per stage and twice u's bytes. Float32 inputs get the
# same arithmetic either way. H100, B=2 H=16 K=V=128 bf16, T=32K fwd+bwd: 7.36 ms "forward",
# 6.81 ms "inputs" (with dk's partial in bf16; fla-core 0.6.0: 7.11); bf16 errors at B=2 T=1000
# H=4 D=64: dq 3.95e-3 -> 4.73e-3 (fla 4.72e-3), dk 5.08e-3 -> 5.88e-3 (fla 6.09e-3), the rest
# within 4% and at or under fla's (reports/delta_rule.md). float16 keeps "forward": with
# "inputs" its d(initial state) crossed the check's tolerance on the CI suite's basic case
# (9.84e-4 against 9.57e-4; "forward" 9.30e-4). BWD_RECOMPUTE, if set, forces one mode.
BWD_RECOMPUTE_BY_DTYPE = {torch.bfloat16: "inputs", torch.float16: "forward", torch.float32: "forward"}
BWD_RECOMPUTE = None
# dk's share from dq/dk (v' dh^T + scale dS^T Q), handed to the WY backward rounded to the
# inputs' dtype (False, as fla's) or in float32 (True: twice the bytes written and read back).
# bf16 at T=32K (as above): False took fwd+bwd from 7.36 to 7.18 ms, dk 5.08e-3 -> 5.35e-3.
# float16 keeps float32 (dk 7.3e-4 against 7.9e-4 on the CI suite's basic case).
DK_PARTIAL_FLOAT32_BY_DTYPE = {torch.bfloat16: False, torch.float16: True, torch.float32: True}
DK_PARTIAL_FLOAT32 = None
# SAVE_STATES: the forward keeps w, h and v' for the backward, which then skips its recompute
# of w, u (wy.recompute_w_u_fwd) and its second forward state walk; the gradients are those of
# the forward's own h and v' (BWD_RECOMPUTE no longer applies). Held from the forward to the
# backward per token and head, in the inputs' dtype: K (w) + V (v') + K*V/BT (h) values, on
# top of Ai's BT floats: at K = V = 128, bf16, 1280 bytes instead of 256. They go through
# ctx.save_for_backward (so saved-tensor hooks, checkpointing and offloading, see them), which
# keeps them to the end of the backward: one forward + backward peaks higher by w and, in
# wy_bwd, h and v'. H200, B=2 T=32K H=16 K=V=128 bf16 (reports/delta_rule.md): fwd+bwd 5.930
# -> 5.084 ms, its peak 2816 -> 3074 MB (fla-core 0.6.0: 5.934 ms, 3714 MB). False recomputes
# them as fla-core does, for the least activation memory held across layers.
SAVE_STATES = True
# FUSED_OUTPUT: the forward walk writes O itself (chunk_state.chunk_fwd_h_o), so nothing reads
# h back and inference stores neither h nor v'; the same arithmetic as chunk_fwd_o, the same
# results up to summation order. Its cost: the walk (one program per value tile and head,
# chunks in order) gains Q S, Q K^T and tril(Q K^T) v' per chunk, Q K^T once per value tile.
# H200 prediction at B=2 T=32K H=16 K=V=128 bf16: the output stage's 0.41 ms goes, the walk
# (~0.57 ms) grows by what of the three products its dependent chain does not hide. Timed
# once, at T=8K with every kernel's first config (LINATTN_AUTOTUNE=0, H200, 2026-12-01): fwd
# 0.724 -> 0.693 ms, fwd+bwd 1.573 -> 1.558, inference peak 384 -> 256 MB; off until timed
# tuned beside fla at 2K-32K (reports/delta_rule.md, FUSED_OUTPUT; reports/NOTES.md).
FUSED_OUTPUT = False


class Saved(NamedTuple):
    """What the forward hands the backward: Ai (float32), and with SAVE_STATES w, h, v' (the
    inputs' dtype; None when the backward is to recompute them)."""
    Ai: torch.Tensor
    w: torch.Tensor | None = None
    h: torch.Tensor | None = None
    v_new: torch.Tensor | None = None


def chunk_delta_rule_fwd(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens,
                         for_backward: bool = True):
    """Returns (o, final_state or None, Saved or None): q, k already normalised if asked. What
    the backward needs is kept only ``for_backward``; each intermediate is freed as soon as the
    last stage that reads it is done (the forward's peak memory is what it holds at once)."""
    B, T, H, K = k.shape
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, BT)
    if FUSED_WY_FWD:
        Ai, w, u = wy_fwd(k, v, beta, cu_seqlens, chunk_indices, NT, BT)
    else:
        A = kkt_fwd(k, beta, cu_seqlens, chunk_indices, NT, BT)
        Ai = solve_tril(A, cu_seqlens, chunk_indices)
        del A
        w, u = recompute_w_u_fwd(k, v, beta, Ai, cu_seqlens, chunk_indices, NT, BT)
    if not for_backward:
        Ai = None  # inference keeps nothing: the walk's peak is then w, u, h and v'
    keep = for_backward and SAVE_STATES
    if FUSED_OUTPUT:
        o, ht, h, v_new = chunk_fwd_h_o(q, k, w, u, scale, initial_state, output_final_state,
                                        keep, cu_seqlens, chunk_offsets, N, NT, BT)
        del u
    else:
        h, v_new, ht = chunk_fwd_h(k, w, u, initial_state, output_final_state, cu_seqlens,
                                   chunk_offsets, N, NT, BT)
        del u
        if not keep:
            w = None  # the output stage does not read it
        o = chunk_fwd_o(q, k, v_new, h, scale, cu_seqlens, chunk_indices, NT, BT)
    if not for_backward:
        return o, ht, None
    return o, ht, Saved(Ai, w, h, v_new) if keep else Saved(Ai)


def chunk_delta_rule_bwd(q, k, v, beta, saved: Saved, scale, initial_state, do, dht, cu_seqlens,
                         qk_grad_dtype=None):
    """Returns (dq, dk, dv, dbeta, d(initial_state) or None): dq, dk in ``qk_grad_dtype``
    (default the inputs'), dv, dbeta in v's and beta's dtypes, d(initial_state) float32.
    w, h and v' come from ``saved`` when the forward kept them, else they are recomputed."""
    B, T, H, K = k.shape
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, BT)
    dk32 = DK_PARTIAL_FLOAT32_BY_DTYPE[k.dtype] if DK_PARTIAL_FLOAT32 is None else DK_PARTIAL_FLOAT32
    mode = BWD_RECOMPUTE_BY_DTYPE[k.dtype] if BWD_RECOMPUTE is None else BWD_RECOMPUTE
    if mode not in ("forward", "inputs"):
        raise ValueError(f"BWD_RECOMPUTE: expected 'forward' or 'inputs', got {mode!r}")
    Ai, w, h, v_new = saved
    del saved  # from here on each intermediate is freed after the last stage that reads it
    if h is None:
        fast = mode == "inputs"
        w, u = recompute_w_u_fwd(k, v, beta, Ai, cu_seqlens, chunk_indices, NT, BT,
                                 in_inputs_dtype=fast)
        h, v_new, _ = chunk_fwd_h(k, w, u, initial_state, False, cu_seqlens, chunk_offsets, N,
                                  NT, BT, mixed="round" if fast else None)
        del u
    dv_local = chunk_bwd_dv_local(q, k, do, scale, cu_seqlens, chunk_indices, NT, BT)
    dh, dv_new, dh0 = chunk_bwd_dh(q, k, w, do, dv_local, dht, scale, initial_state is not None,
                                   cu_seqlens, chunk_offsets, N, NT, BT)
    del w, dv_local
    dq, dk, dw = chunk_bwd_dqk(q, k, v_new, h, do, dh, dv_new, scale, cu_seqlens, chunk_indices,
                               NT, BT, dq_dtype=qk_grad_dtype,
                               dk_dtype=torch.float32 if dk32 else k.dtype)
    del h, dh, v_new
    dk, dv, dbeta = wy_bwd(k, v, beta, Ai, dw, dv_new, dk, cu_seqlens, chunk_indices, NT, BT,
                           grad_dtype=qk_grad_dtype)
    return dq, dk, dv, dbeta, dh0


def _one_token_each(T: int, cu_seqlens) -> bool:
    """Every sequence is one token long (decoding through this API). The chunked stages then
    gain nothing (a chunk of one token, eight launches) and the recurrent kernel, one launch, is
    the decoding path. It is also more accurate there: the chunked form stores v' in the
    inputs' dtype between its stages, and a one-token dq = scale (dO . v') k is a single dot
    product: in bf16, rounding v' cost dq 1.8e-2 on the H100 (1.7e-2 emulated), where
    the recurrent kernel keeps v' in float32 registers."""
    if cu_seqlens is None:
        return T == 1
    return bool((torch.diff(cu_seqlens) <= 1).all())


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                cu_seqlens):
        q_rstd = k_rstd = None
        if use_qk_l2norm:
            (q, q_rstd), (k, k_rstd) = l2norm_fwd(q), l2norm_fwd(k)
        o, ht, saved = chunk_delta_rule_fwd(q, k, v, beta, scale, initial_state,
                                            output_final_state, cu_seqlens,
                                            for_backward=any(ctx.needs_input_grad))
        saved = saved or Saved(None)
        ctx.save_for_backward(q, k, v, beta, *saved, initial_state, q_rstd, k_rstd, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, Ai, w, h, v_new, initial_state, q_rstd, k_rstd, cu_seqlens = ctx.saved_tensors
        l2 = q_rstd is not None  # then dq, dk stay float32 until the normalisation's backward
        dq, dk, dv, dbeta, dh0 = chunk_delta_rule_bwd(
            q, k, v, beta, Saved(Ai, w, h, v_new), ctx.scale, initial_state, do.contiguous(),
            None if dht is None else dht.contiguous(), cu_seqlens,
            qk_grad_dtype=torch.float32 if l2 else None)
        if l2:
            dq, dk = l2norm_bwd(q, q_rstd, dq), l2norm_bwd(k, k_rstd, dk)
        dh0 = None if dh0 is None else dh0.to(initial_state.dtype)
        return dq, dk, dv, dbeta, None, dh0, None, None, None


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule in chunks of 64 tokens (Triton), forward and backward.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (or [B, T, H, V], handed to the
    recurrent kernel); initial_state: [N, H, K, V]; cu_seqlens: int64 [N + 1] with B == 1.
    K, V <= 256. Returns o [B, T, H, V] (dtype of v) and the final state [N, H, K, V]
    (float32) when ``output_final_state``.
    """
    dims = DELTA_RULE.validate(locals())  # the call's own arguments, before anything else
    check_launchable("chunk_delta_rule", q)
    if max(dims["K"], dims["V"]) > 256:
        raise ValueError(f"chunk_delta_rule: K and V must be <= 256, got K={dims['K']}, V={dims['V']}")
    if beta.dim() == 4 or _one_token_each(dims["T"], cu_seqlens):
        return fused_recurrent_delta_rule(q, k, v, beta, scale, initial_state, output_final_state,
                                          use_qk_l2norm_in_kernel, cu_seqlens)
    scale = DELTA_RULE.resolve_scale(scale, dims)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return ChunkDeltaRuleFunction.apply(q, k, v, beta, scale, initial_state, output_final_state,
                                        use_qk_l2norm_in_kernel, cu_seqlens)
