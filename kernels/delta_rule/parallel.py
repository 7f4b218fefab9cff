"""Delta rule, parallel form (OPERATORS.md section 1): the output and, on request, the whole
attention matrix A with o = A v, for inference (zero initial state, no varlen, forward only).

With a zero initial state the delta rule is linear in v, so per (sequence, head) there is one
T x T matrix A with o_t = sum_s A[t, s] v_s, i.e. A[t, s] = d o_t / d v_s (beta is per token,
so every value channel sees the same A; A is lower-triangular, A[t, s] = 0 for s > t).

Derivation. Cut the sequence into chunks of BT = 64 tokens (Q~ = scale Q; in chunk c:
K_c, V_c, beta_c). The WY stages of the chunked form give, per chunk,

    Ai_c = (I + tril(diag(beta_c) K_c K_c^T, -1))^{-1}              # wy.kkt_fwd, solve_tril
    W_c  = Ai_c diag(beta_c) K_c,   U_c = Ai_c diag(beta_c) V_c

and, with S_c the state entering chunk c (S_0 = 0), the chunk's v' = U_c - W_c S_c, so

    S_{c+1} = P_c S_c + K_c^T U_c,   P_c = I - K_c^T W_c
    O_i     = Q'_i S_i + tril(Q~_i K_i^T) U_i,   Q'_i = Q~_i - tril(Q~_i K_i^T) W_i
    S_i     = sum_{j<i} P_{i-1} ... P_{j+1} K_j^T U_j.

Reading off the coefficient of V_j gives the attention blocks of query chunk i:

    A_ii = tril(Q~_i K_i^T) Ai_i diag(beta_i)
    A_ij = G_ij K_j^T Ai_j diag(beta_j)   (j < i),   G_{i,i-1} = Q'_i,  G_{i,j-1} = G_ij P_j.

Both have the form A_ij = M_ij Ai_j diag(beta_j) with M_ij = G_ij K_j^T (masked to tril for
j = i, where G_ii = Q~_i), and since M_ij Ai_j diag(beta_j) K_j = A_ij K_j the next G is

    G_{i,j-1} = G_ij - G_ij K_j^T W_j = G_ij - A_ij K_j        (for j = i: G = Q'_i)

so W_j is never formed. One program per (query chunk i, sequence and head) keeps G [BT, K] in
float32 registers and sweeps j = i, i-1, ..., 0: M = G K_j^T, A_ij = (M Ai_j) diag(beta_j),
o_i += A_ij V_j, G -= A_ij K_j; it writes A_ij, and zeros for j > i, when asked. Cost: T^2/BT
blocks of four BT x BT x {K, BT, K, V} products, against the chunked form's T; it is the
price of A, and of O(T / BT) parallel query chunks with no sequential walk over chunks.

Dtypes: o and A have the dtype of v (o accumulates in float32). K, V <= 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from harness.operators import DELTA_RULE
from kernels.common.solve_tril import solve_tril
from kernels.common.utils import dot_precision, tile
from kernels.delta_rule.wy import kkt_fwd

__all__ = ["parallel_delta_rule", "parallel_delta_rule_fwd"]

BT = 64  # chunk size: a tiling choice, never a change of result
MAX_D = 256  # G [BT, K] is held in registers


@triton.heuristics({'STORE_ATTN': lambda a: a['attn'] is not None})
@triton.jit(do_not_specialize=['T'])
def parallel_delta_rule_fwd_kernel(
    q, k, v, beta, Ai, o, attn, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, STORE_ATTN: tl.constexpr,
):
    """Rows of query chunk i_t: o_i = sum_{j <= i} A_ij V_j, and A_ij (float32 o)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    i_t = NT - 1 - i_c  # longest sweeps first
    bos = i_b.to(tl.int64) * T
    o_c = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_i = i_t * BT + o_c  # query positions
    m_i = o_i < T
    o_qrow = (bos + o_i) * H + i_h
    o_arow = (i_bh.to(tl.int64) * T + o_i[:, None]) * T  # rows of A [B, H, T, T]
    # [BT, BK]: G_ii = Q~_i
    b_g = tl.load(q + o_qrow[:, None] * K + o_k[None, :], mask=m_i[:, None] & m_k[None, :],
                  other=0.).to(tl.float32) * scale
    for i_n in range(0, i_t + 1):
        i_j = i_t - i_n
        o_j = i_j * BT + o_c  # key positions
        m_j = o_j < T
        o_krow = (bos + o_j) * H + i_h
        # [BT, BK]
        b_k = tl.load(k + o_krow[:, None] * K + o_k[None, :], mask=m_j[:, None] & m_k[None, :],
                      other=0.).to(tl.float32)
        b_beta = tl.load(beta + o_krow, mask=m_j, other=0.).to(tl.float32)
        # [BT, BT]
        b_ai = tl.load(Ai + o_krow[:, None] * BT + o_c[None, :], mask=m_j[:, None], other=0.)
        # M_ij = G_ij K_j^T (tril for j = i); A_ij = M_ij Ai_j diag(beta_j)
        b_m = tl.dot(b_g, tl.trans(b_k), input_precision=PRECISION)
        b_m = tl.where((o_c[:, None] >= o_c[None, :]) | (i_j < i_t), b_m, 0.)
        b_a = tl.dot(b_m, b_ai, input_precision=PRECISION) * b_beta[None, :]
        # G_{i,j-1} = G_ij P_j = G_ij - A_ij K_j
        b_g -= tl.dot(b_a, b_k, input_precision=PRECISION)
        # o_i += A_ij V_j, in the program's own float32 rows of o (written at j = i)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            # [BT, BV]
            b_v = tl.load(v + o_krow[:, None] * V + o_v[None, :],
                          mask=m_j[:, None] & m_v[None, :], other=0.).to(tl.float32)
            p_o = o + o_qrow[:, None] * V + o_v[None, :]
            m_o = m_i[:, None] & m_v[None, :]
            b_o = tl.load(p_o, mask=m_o & (i_j < i_t), other=0.)
            b_o += tl.dot(b_a, b_v, input_precision=PRECISION)
            tl.store(p_o, b_o, mask=m_o)
        if STORE_ATTN:
            tl.store(attn + o_arow + o_j[None, :], b_a.to(attn.dtype.element_ty),
                     mask=m_i[:, None] & m_j[None, :])
    if STORE_ATTN:
        # the blocks above the diagonal, j > i, are zero
        for i_j in range(i_t + 1, NT):
            o_j = i_j * BT + o_c
            tl.store(attn + o_arow + o_j[None, :], tl.zeros([BT, BT], dtype=attn.dtype.element_ty),
                     mask=m_i[:, None] & (o_j < T)[None, :])


def parallel_delta_rule_fwd(q, k, v, beta, scale: float, output_attentions: bool):
    """(o [B,T,H,V], A [B,H,T,T] or None), both in v's dtype; inputs contiguous, checked."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    Ai = solve_tril(kkt_fwd(k, beta, None, None, NT, BT))
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=v.device)
    attn = torch.empty(B, H, T, T, dtype=v.dtype, device=v.device) if output_attentions else None
    BK = tile(K, cap=256)
    BV = tile(V)
    if NT:
        parallel_delta_rule_fwd_kernel[(NT, B * H)](
            q, k, v, beta, Ai, o, attn, scale, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            PRECISION=dot_precision(k.dtype), num_warps=8 if BK > 64 else 4)
    return o.to(v.dtype), attn


def parallel_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The delta rule in parallel form (Triton), forward only, from a zero state.

    Args:
        q, k: ``[B, T, H, K]``, K <= 256.  v: ``[B, T, H, V]``, V <= 256 (one dtype).
        beta: ``[B, T, H]`` (per token only: a per-channel beta has no single A).
        scale: multiplies q before the read-out; ``None`` means ``K ** -0.5``.
        output_attentions: also return A ``[B, H, T, T]`` with ``o[b, :, h] = A[b, h] @ v[b, :, h]``
            (A[t, s] = d o_t / d v_s; zero above the diagonal).

    Returns:
        ``o [B, T, H, V]`` and A or None, both in v's dtype.

    Inference only: no gradients (train with ``chunk_delta_rule``, which also takes an
    initial state and ``cu_seqlens``).
    """
    dims = DELTA_RULE.validate(dict(q=q, k=k, v=v, beta=beta, scale=scale))
    if not isinstance(output_attentions, bool):
        raise TypeError(f"parallel_delta_rule: 'output_attentions' must be a bool, "
                        f"got {output_attentions!r}")
    if beta.dim() != 3:
        raise ValueError(f"parallel_delta_rule: 'beta' must be per token, [B, T, H] = "
                         f"{[dims['B'], dims['T'], dims['H']]}, got shape {list(beta.shape)} "
                         f"(per-channel beta: use chunk_delta_rule)")
    if max(dims["K"], dims["V"]) > MAX_D:
        raise ValueError(f"parallel_delta_rule: K and V must be <= {MAX_D}, "
                         f"got K={dims['K']}, V={dims['V']}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, beta)):
        raise NotImplementedError(
            "parallel_delta_rule is forward only (inference): it has no backward; use "
            "chunk_delta_rule for training, or call it under torch.no_grad()")
    scale = DELTA_RULE.resolve_scale(scale, dims)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    return parallel_delta_rule_fwd(q, k, v, beta, scale, output_attentions)
