"""TTT-Linear, chunked form (docs/operators.md section 3): the states per mini-batch materialised,
the outputs of every mini-batch in parallel, and a backward whose sequential walk holds only
what depends on the later mini-batches (kernels.ttt.chunk_bwd).

The mini-batch recurrence needs, per mini-batch, only Z = K W + 1 hb, the reconstruction
gradients G and the update W <- W - eta_last K^T G, hb <- hb - eta_last 1^T G. One program per
(sequence, head) walks that (kernels.ttt.fused_chunk's forward kernel without the output),
storing the W, hb each mini-batch starts from; then one program per (mini-batch, head) forms
its output from them, all in parallel:

    G = ln_recon_grad(K W + 1 hb, V - K)
    U = Q~ W + 1 hb - eta * ((tril(Q~ K^T) + tril(1)) G),   O = U + w * LN(U) + b

so the walk's dependent chain holds two products a mini-batch instead of five. The backward
does the same from the same stored states: the gradient of each mini-batch's starting weights
depends on the next one's through K dW', G's LayerNorm backward and K^T dZ alone, and
everything else is formed in parallel before and after that walk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.minibatch import mini_batch_program
from kernels.common.utils import chunk_layout, store_rows
from kernels.ttt.chunk_bwd import chunk_backward
from kernels.ttt.fused_chunk import (FusedChunkTTTFunction, checked_inputs, launch_meta,
                                     load_state, mini_batch_outputs, mini_batch_rows,
                                     output_mixed, recon_grads, run_forward,
                                     save_for_backward, walk_mixed)

__all__ = ["chunk_ttt_linear"]


@triton.heuristics({'IS_VARLEN': lambda a: a['cu_seqlens'] is not None})
@triton.jit(do_not_specialize=['T'])
def chunk_ttt_linear_fwd_o_kernel(
    q, k, v, w, b, eta, o, hs, hbs, cu_seqlens, chunk_indices, scale, eps, T,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr, MIXED: tl.constexpr, OMIXED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: its output from the W, hb it starts with (module docstring)."""
    i_s, row0, o_c, m_t, _, o_d, m_d, o_s, m_s, b_w, b_b = mini_batch_program(
        w, b, cu_seqlens, chunk_indices, T, H, D, BD, BC, IS_VARLEN)
    b_W, b_hb = load_state(hs, hbs, i_s, o_s, m_s, o_d, m_d, D)
    b_q, b_k, b_v, b_e = mini_batch_rows(q, k, v, eta, row0, o_c, m_t, o_d, scale, D, H)
    b_g, _ = recon_grads(b_k, b_v, b_W, b_hb, b_w, b_b, m_t, m_d, D, eps, k.dtype.element_ty,
                         PRECISION, MIXED)
    b_o = mini_batch_outputs(b_q, b_k, b_e, b_g, b_W, b_hb, b_w, b_b, o_c, m_d, D, eps,
                             k.dtype.element_ty, PRECISION, OMIXED)
    store_rows(o + row0 * D, b_o, o_c, m_t, o_d, D, H)


def _chunk_forward(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0, output_final_state,
                   cu_seqlens):
    """(o, final W, final hb, the states each mini-batch starts from (W, hb)); inputs checked."""
    B, T, H, D = q.shape
    _, ht, hbt, hs, hbs = run_forward(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0,
                                   output_final_state, cu_seqlens, keep_states=True,
                                   with_output=False)
    _, NT, chunk_indices, _ = chunk_layout(B, T, cu_seqlens, chunk_size)
    o = torch.empty_like(v)
    if NT:
        chunk_ttt_linear_fwd_o_kernel[(NT, B * H)](
            q, k, v, w, b, eta, o, hs, hbs, cu_seqlens, chunk_indices, scale, float(eps), T,
            MIXED=walk_mixed(), OMIXED=output_mixed(), **launch_meta(q, chunk_size))
    return o, ht, hbt, hs, hbs


class ChunkTTTFunction(FusedChunkTTTFunction):
    """fused_chunk_ttt_linear's autograd Function with this module's forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0, output_final_state,
                cu_seqlens):
        results = _chunk_forward(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0,
                                 output_final_state, cu_seqlens)
        return save_for_backward(ctx, chunk_backward, results, q, k, v, w, b, eta, scale, eps,
                                 chunk_size, h0, hb0, cu_seqlens)


def chunk_ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    eta: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    initial_state_bias: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """TTT-Linear with the states per mini-batch materialised and the outputs in parallel
    (Triton); fused_chunk_ttt_linear's arguments, results and limits."""
    q, k, v, w, b, eta, scale, h0, hb0, grad = checked_inputs(
        "chunk_ttt_linear", q, k, v, w, b, eta, scale, eps, chunk_size, initial_state,
        initial_state_bias, output_final_state, cu_seqlens)
    if grad:
        return ChunkTTTFunction.apply(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0,
                                      output_final_state, cu_seqlens)
    o, ht, hbt, _, _ = _chunk_forward(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0,
                                      output_final_state, cu_seqlens)
    return o, ht, hbt
