"""GLA, chunks walked in one program (docs/operators.md section 2), key gate: the forward's walk
runs per (sequence, head, value tile) with the state on chip and writes no per-chunk state.

chunk_gla (kernels.gla.chunk) stores the state entering every chunk (float32, K V per chunk and
head) between its walk and its output stage. Here, after chunk_gla's gates stage and A kernel
(kernels.gla.chunk.gated_operands, intra_chunk_A: every chunk in parallel), one kernel walks
each sequence's chunks and writes the output on the way:

    for each chunk n, with S = h[n] on chip and b the chunk's cumulative log gate:
        O_I = scale (Q_I * exp(b_I)) S + A_I V          for each 16-row block I
        S   = diag(exp(b_L)) S + (K * exp(b_L - b))^T V

so the two forwards agree to rounding. There are only N H V / BV programs, each walking its
chunks in order with the output's products inside the loop: the kernel is for short sequences,
where launches bound the forward (four launches, only the gates stage autotuned, no
state tensor). H200, B = 2, H = 16, K = V = 128 bf16 (reports/gla.md): the forward at T = 2048
0.376 ms against chunk_gla's 0.544 and fla's 0.703; at 8K 1.133 against chunk_gla's 0.706.

The backward recomputes the states and A with chunk_gla's stages and runs chunk_gla's backward:
a forward for training keeps no per-chunk tensor alive until the backward. A backward in one
walk would not keep the states off memory either: the gate's gradient needs, per chunk and key
channel, rowsum(h[n] * dH[n]), the product of a quantity that runs forward (the state entering
chunk n) and one that runs backward (the gradient of the state leaving it), so one of them must
be kept per chunk (fused_recurrent_gla keeps the states every 64 tokens for the same reason),
and that is what chunk_gla's backward already does, in parallel over chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.utils import chunk_layout, dot_precision, load_rows, seq_bounds, store_rows
from kernels.gla.chunk import (BC, BT, checked_inputs, chunk_gla_fwd, gated_operands, gradients,
                              intra_chunk_A)

__all__ = ["fused_chunk_gla"]


def value_tile(K: int, V: int) -> int:
    """The value tile of the walk (the state [K, BV] whole K, float32, in registers): 32 above
    64 keys, as sm_90's shared memory allows with the walk unpipelined (num_stages=1); at
    least 16, the narrowest tl.dot."""
    return min(64 if K <= 64 else 32, max(16, triton.next_power_of_2(V)))


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def fused_chunk_gla_fwd_kernel(
    qg, kd, v, b, A, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence, head and value tile: O = scale (Q * exp(b)) S + A V, then
    S = diag(exp(b_L)) S + (K * exp(b_L - b))^T V, chunk after chunk (S [BK, BV] float32, the
    whole key width, rounded to the inputs' dtype for the output's product as chunk_gla's output
    stage reads it; qg, kd, A as chunk_gla's forward forms them)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    L = eos - bos
    o_c = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    o_s = o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_s, mask=m_s, other=0.)
    for i_t in range(tl.cdiv(L, BT)):
        row0 = (bos + i_t * BT) * H + i_h
        m_t = i_t * BT + o_c < L
        n_t = tl.minimum(BT, L - i_t * BT)
        b_v = load_rows(v + row0 * V, o_c, m_t, o_v, V, H)
        for I in tl.static_range(BT // BC):  # by 16-row blocks: [BT, BK] tiles spilled
            o_r = I * BC + tl.arange(0, BC)
            m_r = o_r < n_t
            b_qg = load_rows(qg + row0 * K, o_r, m_r, o_k, K, H)
            b_A = load_rows(A + row0 * BT, o_r, m_r, o_c, BT, H)
            b_o = (tl.dot(b_qg, b_s.to(b_qg.dtype), input_precision=PRECISION) * scale
                   + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PRECISION))
            store_rows(o + row0 * V, b_o, o_r, m_r, o_v, V, H)
        b_bl = tl.load(b + (row0 + (n_t - 1) * H) * K + o_k, mask=m_k, other=0.)
        b_kd = load_rows(kd + row0 * K, o_c, m_t, o_k, K, H)
        b_s = b_s * tl.exp(b_bl)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PRECISION)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_s, b_s, mask=m_s)


def fused_chunk_gla_fwd(q, k, v, g, scale: float, initial_state, output_final_state: bool,
                        cu_seqlens):
    """(o [B,T,H,V] in v's dtype, final state [N,H,K,V] float32 or None); inputs contiguous
    and checked."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, NT, chunk_indices, _ = chunk_layout(B, T, cu_seqlens, BT)
    b, blo, qg, kd = gated_operands(g, q, k, cu_seqlens, chunk_indices, NT)
    A = intra_chunk_A(q, k, b, blo, scale, cu_seqlens, chunk_indices, NT, q.dtype)
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    BV = value_tile(K, V)
    fused_chunk_gla_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        qg, kd, v, b, A, o, initial_state, ht, cu_seqlens, scale, T, H=H, K=K, V=V, BT=BT,
        BC=BC, BK=triton.next_power_of_2(K), BV=BV, PRECISION=dot_precision(q.dtype),
        num_warps=8 if K > 64 else 4, num_stages=1)
    return o, ht


class FusedChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        o, ht = fused_chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state,
                                    cu_seqlens)
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
        # the states and A again, from chunk_gla's stages (its output is not needed)
        _, _, saved = chunk_gla_fwd(q, k, v, g, ctx.scale, initial_state, False, cu_seqlens,
                                    with_output=False)
        return gradients(q, k, v, g, saved, ctx.scale, initial_state, cu_seqlens, do, dht)


def fused_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with each sequence's chunks of 64 walked in one program (Triton),
    key gate ``g`` ([B,T,H,K], log space, <= 0); chunk_gla's arguments and results."""
    q, k, v, g, scale, initial_state, grad = checked_inputs(
        "fused_chunk_gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if grad:
        return FusedChunkGLAFunction.apply(q, k, v, g, scale, initial_state, output_final_state,
                                           cu_seqlens)
    return fused_chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
