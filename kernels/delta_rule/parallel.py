"""Delta rule, parallel form (docs/operators.md section 1): the output and, on request, the whole
attention matrix A with o = A v, for inference (zero initial state, no varlen, forward only).

With a zero initial state the delta rule is linear in v, so per (sequence, head) there is one
T x T matrix A with o_t = sum_s A[t, s] v_s, i.e. A[t, s] = d o_t / d v_s (beta is per token,
so every value channel sees the same A; A is lower-triangular, A[t, s] = 0 for s > t).

Derivation. Cut the sequence into chunks of BT = 64 tokens (Q~ = scale Q; in chunk c:
K_c, V_c, beta_c). The WY stages of the chunked form give, per chunk,

    Ai_c = (I + tril(diag(beta_c) K_c K_c^T, -1))^{-1}              # wy.wy_fwd, with W and U
    W_c  = Ai_c diag(beta_c) K_c,   U_c = Ai_c diag(beta_c) V_c

and, with S_c the state entering chunk c (S_0 = 0), the chunk's v' = U_c - W_c S_c, so

    S_{c+1} = P_c S_c + K_c^T U_c,   P_c = I - K_c^T W_c
    O_i     = Q'_i S_i + tril(Q~_i K_i^T) U_i,   Q'_i = Q~_i - tril(Q~_i K_i^T) W_i
    S_i     = sum_{j<i} P_{i-1} ... P_{j+1} K_j^T U_j.

Reading off the coefficient of V_j gives the attention blocks of query chunk i:

    A_ii = tril(Q~_i K_i^T) Ai_i diag(beta_i)
    A_ij = G_ij K_j^T Ai_j diag(beta_j)   (j < i),   G_{i,i-1} = Q'_i,  G_{i,j-1} = G_ij P_j.

Both have the form A_ij = M_ij Ai_j diag(beta_j) with M_ij = G_ij K_j^T (masked to tril for
j = i, where G_ii = Q~_i). With the chunked form's W_j = Ai_j diag(beta_j) K_j and
U_j = Ai_j diag(beta_j) V_j (wy.wy_fwd), the output and the next G need M alone:

    o_i      = sum_{j <= i} A_ij V_j = sum_{j <= i} M_ij U_j
    G_{i,j-1} = G_ij P_j = G_ij - A_ij K_j = G_ij - M_ij W_j      (for j = i: G = Q'_i)

One program per (value tile, query chunk i, sequence and head) keeps G [BT, K] and o_i
[BT, BV] in float32 registers and sweeps j = i, i-1, ..., 0: M = G K_j^T, o_i += M U_j,
G -= M W_j (three products, two of them in G's dependent chain); when asked it also writes
A_ij = M Ai_j diag(beta_j), and zeros for j > i. Cost: T^2 / (2 BT) blocks of three
BT x BT x {K, V, K} products, against the chunked form's T / BT chunks; it is the price of A,
and of O(T / BT) parallel query chunks with no sequential walk over chunks. A value dimension
over BV_MAX = 128 is split over programs, each redoing the G sweep (V = 256 only).

Arithmetic. G and U are float32, K, W, V in the inputs' dtype. For half-precision inputs
the two float32 operands enter their products as MIXED_BY_DTYPE says (utils.dot_mixed): bf16
rounds them (as the chunked forward walk does: "round"), fp16 keeps ~16 bits of them as
hi + lo halves ("split"); M is rounded to the inputs' dtype for o += M U and G -= M W (as the
chunked output stage rounds tril(Q K^T)). H200, bf16, against the float64 truth on the same
rounded inputs (reports/delta_rule.md, the parallel form): o 4.4e-3 at B=2 T=1000
H=4 D=64 and 4.3e-3 at T=2048 D=128 (the CPU emulation of these roundings said 3.6e-3 and
3.5e-3), where the chunked kernel's o is 4.0e-3 and the check's bf16 floor alone 3.9e-3;
fp16 4.4e-4; float32 6e-7. Until 2026-12-01 every product here was float32 in
three TF32 passes and o went through global memory each step: o 1.7e-3 in bf16, but 10-12
TFLOP/s. The same run, B=2 H=16 K=V=128 bf16, output only, the first config (8 warps, untuned): 0.462 ms at T=2048 (was 5.250),
5.26 ms at 8K (was 71.98), 80.6 ms at 32K (was 1107, reports/bench), 115-164 TFLOP/s of the
three products. Float32 inputs get exact ("ieee") products throughout. A is stored from the
unrounded M (float32 products).

Dtypes: o and A have the dtype of v (o accumulates in float32). K, V <= 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from references.operators import DELTA_RULE
from kernels.common.utils import (check_launchable, dot_mixed, dot_precision, finite_part,
                                  first_bad_row, load_cols, load_rows, nonfinite_safe, poison_rows,
                                  store_rows, tile, tuning)
from kernels.delta_rule.wy import wy_fwd

__all__ = ["parallel_delta_rule", "parallel_delta_rule_fwd"]

BT = 64  # chunk size: a tiling choice, never a change of result
MAX_D = 256  # G [BT, K] is held in registers
BV_MAX = 128  # o [BT, BV] too; a larger V is split over programs
# How the float32 G and U enter their products with the half-precision K and M (see above);
# MIXED forces one mode. Float32 inputs: every product exact.
MIXED_BY_DTYPE = {torch.bfloat16: "round", torch.float16: "split", torch.float32: "split"}
MIXED = None

# G and o take 2 x 64 float32 registers a thread at K = V = 128 and 4 warps, beside K_j, W_j,
# U_j and M: 8 warps keep them out of local memory. The first config is the one the
# interpreter and numerical checks pin (warps and stages change no arithmetic).
PARALLEL_CONFIGS = tuning([triton.Config({}, num_warps=w, num_stages=s)
                           for w in (8, 4) for s in (2, 3, 1)])


@triton.jit
def _sweep_step(b_g, b_o, b_m, k, w, u, beta, Ai, attn, row_j, a_ij, m_i, m_j, o_c, o_k, o_v, T,
                store_a, DIAG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                H: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
                STORE_ATTN: tl.constexpr, SAFE: tl.constexpr):
    """One step j of the sweep, M_ij = b_m given: o_i += M U_j, G -= M W_j, A_ij = M Ai_j
    diag(beta_j) at attn + a_ij when STORE_ATTN and store_a (the first value tile). On the
    diagonal (DIAG) U_j, W_j, Ai_j and beta_j are read through utils.finite_part and the rows
    the math makes non-finite set to NaN after the products: the tril zeros would carry a
    later row's NaN to every row. Off the diagonal every row of chunk j is earlier than every
    row of chunk i, so its NaN is already where it belongs."""
    b_mh = b_m.to(k.dtype.element_ty)
    b_u = load_rows(u + row_j * V, o_c, m_j, o_v, V, H)
    b_w = load_rows(w + row_j * K, o_c, m_j, o_k, K, H)
    if DIAG and SAFE:
        b_u, b_bad_u = finite_part(b_u, SAFE)
        b_w, b_bad_w = finite_part(b_w, SAFE)
        first_w = tl.min(first_bad_row(b_bad_w, o_c, BT), 0)  # w's NaN rows: k or beta's
    b_o += dot_mixed(b_mh, b_u, PRECISION, MIXED)
    b_g -= tl.dot(b_mh, b_w, input_precision=PRECISION)
    if DIAG and SAFE:
        b_o = poison_rows(b_o, o_c, tl.minimum(first_bad_row(b_bad_u, o_c, BT), first_w), SAFE)
        b_g = tl.where(o_c[:, None] >= first_w, float("nan"), b_g)
    if STORE_ATTN:
        if store_a:
            # A_ij = M_ij Ai_j diag(beta_j), from the unrounded M
            b_ai = load_rows(Ai + row_j * BT, o_c, m_j, o_c, BT, H)
            b_beta = tl.load(beta + row_j + o_c * H, mask=m_j, other=0.).to(tl.float32)
            if DIAG and SAFE:
                b_ai, _ = finite_part(b_ai, SAFE)
                b_beta, _ = finite_part(b_beta, SAFE)
            b_a = tl.dot(b_m, b_ai, input_precision=PRECISION) * b_beta[None, :]
            if DIAG and SAFE:
                b_a = tl.where(o_c[:, None] >= first_w, float("nan"), b_a)
            tl.store(attn + a_ij + o_c[:, None] * T + o_c[None, :], b_a.to(attn.dtype.element_ty),
                     mask=m_i[:, None] & m_j[None, :])
    return b_g, b_o


@triton.heuristics({'STORE_ATTN': lambda a: a['attn'] is not None})
@triton.autotune(configs=PARALLEL_CONFIGS, key=['H', 'K', 'V', 'BK', 'BV', 'MIXED', 'STORE_ATTN'])
@triton.jit(do_not_specialize=['T'])
def parallel_delta_rule_fwd_kernel(
    q, k, w, u, beta, Ai, o, attn, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr, STORE_ATTN: tl.constexpr,
    SAFE: tl.constexpr,
):
    """Rows of query chunk i_t, value columns of tile i_v: o_i = sum_{j <= i} M_ij U_j with
    M_ij = G_ij K_j^T and G_{i,j-1} = G_ij - M_ij W_j; and A_ij = M_ij Ai_j diag(beta_j)."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    i_t = NT - 1 - i_c  # longest sweeps first
    o_c = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_i = i_t * BT + o_c < T  # query rows that hold tokens
    row_i = (i_b.to(tl.int64) * T + i_t * BT) * H + i_h  # first row of chunk i (int64)
    a_i = (i_bh.to(tl.int64) * T + i_t * BT) * T  # row block i of A (STORE_ATTN)
    store_a = i_v == 0  # one value tile writes A
    # [BT, BK]: G_ii = Q~_i, float32
    b_g = load_rows(q + row_i * K, o_c, m_i, o_k, K, H).to(tl.float32) * scale
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    # j = i: M_ii = tril(G_ii K_i^T)
    b_m = dot_mixed(b_g, load_cols(k + row_i * K, o_c, m_i, o_k, K, H), PRECISION, MIXED)
    b_m = tl.where(o_c[:, None] >= o_c[None, :], b_m, 0.)
    b_g, b_o = _sweep_step(b_g, b_o, b_m, k, w, u, beta, Ai, attn, row_i, a_i + i_t * BT, m_i,
                           m_i, o_c, o_k, o_v, T, store_a, True, K, V, H, BT, PRECISION, MIXED,
                           STORE_ATTN, SAFE)
    for i_n in range(1, i_t + 1):
        i_j = i_t - i_n
        m_j = i_j * BT + o_c < T  # key rows that hold tokens
        row_j = (i_b.to(tl.int64) * T + i_j * BT) * H + i_h
        b_m = dot_mixed(b_g, load_cols(k + row_j * K, o_c, m_j, o_k, K, H), PRECISION, MIXED)
        b_g, b_o = _sweep_step(b_g, b_o, b_m, k, w, u, beta, Ai, attn, row_j, a_i + i_j * BT,
                               m_i, m_j, o_c, o_k, o_v, T, store_a, False, K, V, H, BT,
                               PRECISION, MIXED, STORE_ATTN, SAFE)
    store_rows(o + row_i * V, b_o, o_c, m_i, o_v, V, H)
    if STORE_ATTN:
        if store_a:
            # the blocks above the diagonal, j > i, are zero
            for i_j in range(i_t + 1, NT):
                o_j = i_j * BT + o_c
                tl.store(attn + a_i + o_c[:, None] * T + o_j[None, :],
                         tl.zeros([BT, BT], dtype=attn.dtype.element_ty),
                         mask=m_i[:, None] & (o_j < T)[None, :])


def parallel_delta_rule_fwd(q, k, v, beta, scale: float, output_attentions: bool):
    """(o [B,T,H,V], A [B,H,T,T] or None), both in v's dtype; inputs contiguous, checked."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, BT)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    attn = torch.empty(B, H, T, T, dtype=v.dtype, device=v.device) if output_attentions else None
    if NT:
        Ai, w, u = wy_fwd(k, v, beta, None, None, NT, BT)
        BV = tile(V, cap=BV_MAX)
        grid = (triton.cdiv(V, BV), NT, B * H)
        parallel_delta_rule_fwd_kernel[grid](
            q, k, w, u, beta, Ai, o, attn, scale, T, H=H, K=K, V=V, BT=BT, BK=tile(K, cap=MAX_D),
            BV=BV, PRECISION=dot_precision(k.dtype), MIXED=MIXED or MIXED_BY_DTYPE[k.dtype],
            SAFE=nonfinite_safe())
    return o, attn

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
    check_launchable("parallel_delta_rule", q)
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
