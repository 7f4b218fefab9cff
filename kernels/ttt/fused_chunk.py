"""TTT-Linear, mini-batches walked in one program (docs/operators.md section 3): forward and
backward.

One program per (sequence, head) holds the inner model W [D, D] and hb [D] in float32 and walks
the sequence's mini-batches of C = chunk_size tokens in order. For a mini-batch with rows
Q, K, V [C, D] and learning rates eta [C] (the dual form, references/ttt.py):

    Z  = K W + 1 hb,                 G = ln_recon_grad(Z, V - K)     (kernels.common.layernorm)
    U  = Q~ W + 1 hb - eta * ((tril(Q~ K^T) + tril(1)) G),   Q~ = scale Q
    O  = U + w * LN(U) + b
    W <- W - eta_last K^T G,         hb <- hb - eta_last 1^T G

A last mini-batch shorter than C holds only its real tokens: the rows past the sequence load as
zeros, their G is set to 0 (so they reach no sum and no update) and eta_last is the learning
rate of the last real token. Products of float32 inputs are exact ("ieee"). For half precision
the products of input rows and the state round the state to the inputs' dtype (WALK_MIXED,
"round" by default), the others take float32 operands in three TF32 passes
(utils.dot_precision), but for the outputs' Q~ K^T and Q~ W under OUTPUT_MIXED. WALK_PREFETCH
loads the next mini-batch's rows ahead of its turn.

The backward walks the mini-batches from last to first in one program per (sequence, head),
from the W and hb each started with (the forward stores them when gradients are needed: D^2 + D
float32 values per mini-batch and head), carrying dW and dhb on chip. Per mini-batch it
recomputes Z, G, U and goes back through O = U + w LN(U) + b, U's dual form, the update of W
and hb, and G's LayerNorm backward (its own backward: kernels.common.layernorm), in that order.
dw and db are summed per (sequence, head), then over sequences on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.layernorm import (layer_norm_bwd_rows, layer_norm_rows,
                                     ln_recon_grad_bwd_rows, ln_recon_grad_rows)
from kernels.common.minibatch import (dot_state, load_square, mini_batch_meta, reload_rows,
                                      reload_square, walk_program)
from kernels.common.utils import (check_launchable, chunk_layout, dot_mixed, load_rows,
                                  store_rows)
from references.operators import TTT

__all__ = ["fused_chunk_ttt_linear"]

MAX_D = 128  # W [D, D] float32 on chip: at D = 128, 16384 values, 64 a thread at 8 warps
# The backward's software pipelining: at 3 stages ptxas put its shared memory at 336,896 bytes
# for D = 128 (bf16, the stored W of the next mini-batch staged ahead), over sm_90's 232,448;
# at 1 stage, 180,224 (the loads not staged ahead; python tools/kernel_registers.py ttt --impl
# fused_chunk --case partial-200). Both spill (6.6 KB a thread at 1 stage): not yet timed.
BWD_STAGES = 1
CHUNK_SIZES = (16, 32, 64)  # tl.dot needs 16 rows at least
# How the walks' products of input rows and a float32 state are taken for half-precision
# inputs: Z = K W and the update's K^T G (here, and wherever Z is recomputed), and in
# chunk_ttt_linear's backward walk K dW', Q^T dU and K^T dZ. A utils.dot_mixed mode with the
# rows in their own dtype: "round" (the state rounded to the inputs' dtype, one product),
# "split" (the state as two halves, two products), "tf32" (one TF32 product); or None (both
# operands float32, three TF32 passes). On an H200 (float16, B=2, H=16, D=64, T=8192, with
# WALK_PREFETCH; reports/ttt.md) chunk's forward walk took 821 µs a step under "round", 949
# under "split", 1464 under None, its backward walk 2599, 2947 and 4532; the errors under
# "round" rise (bfloat16 final state 1.6e-7 -> 8.3e-4, gradients by up to 1.7x) and stay
# under fla-core 0.6.0's on every quantity (which rounds the state the same way).
WALK_MIXED = "round"
# The forward walk's loads: the next mini-batch's rows loaded before this one's products, so
# that their latency leaves the walk's dependent chain (True), or each mini-batch's rows when
# it starts (False). 1255 -> 949 µs (chunk's forward walk under "split", same shape as above).
WALK_PREFETCH = True
# The W each mini-batch starts from, stored by the forward for the backward and for chunk's
# outputs (and chunk's backward's dW' per mini-batch): float32 (False), or in the inputs' dtype
# when they are half precision (True: half the bytes; the products that read them take W
# rounded, as the walks' products do under WALK_MIXED "round"). H100, float16, B = 2, H = 16,
# D = 64 (reports/ttt.md): chunk's fwd+bwd peak 2646 MB at 32K against 3670 (fla_chunk 2838),
# fused_chunk's 1042 against 1554 (fla_fused_chunk 1542); chunk's fwd+bwd 17.33 ms against
# 18.32 (with OUTPUT_MIXED None both).
HALF_STATES = True
# How the forward's output products Q~ K^T and Q~ W are taken for half-precision inputs: None,
# float32 operands in three TF32 passes each (Q~ = scale Q and W as float32); or Q~ rounded to
# the inputs' dtype, Q~ K^T one product of half-precision rows and Q~ W as utils.dot_mixed's
# mode ("round": W rounded as the walk's Z = K W is under WALK_MIXED "round"; "split"). Two
# passes instead of six a mini-batch; A G keeps its three passes. H100, as above, forward at
# 8K / 32K: fused_chunk 1.050 / 4.114 ms against 1.519 / 5.773 with None (fla_fused_chunk
# 1.361 / 5.497), chunk 0.822 / 3.176 against 0.998 / 3.943 (fla_chunk 1.122 / 4.502). It
# and HALF_STATES together took the tiling family's worst o from 2.07e-3 to 2.79e-3 in
# bfloat16 (2.57e-4 to 3.49e-4 in float16) and dq by 1.15x, the final states unchanged, the
# other gradients within 10% (chunk's deta 0.6x), every error at most 50% of its tolerance.
OUTPUT_MIXED = "round"
# The backward loads Q~ and W again for its last products when a mini-batch's [C, D] tile holds
# more than this many values (64-token mini-batches at D > 64; kernels/common/minibatch.py,
# reload_square): at C = 64, D = 128 ptxas put the one-walk backward's shared memory at 327,680
# bytes without the loads again and 200,704 with them, chunk_ttt_linear's first backward kernel
# at 262,144 and 196,608 (bfloat16; sm_90 allows 232,448; reports/ttt.md).
RELOAD_TILE = tl.constexpr(64 * 64)
# ptxas's register limit for the kernels' float32 forms: None leaves the choice to ptxas,
# which gives them 32 registers and kilobytes of spills (the float32 products are FMA loops;
# the forward walk at D = 64: 5.5 KB a thread, ptxas -v on its PTX); a .maxnreg of 255 takes
# it to 255 registers and 1.4 KB. The compiler's numbers only: not yet timed on a GPU.
FLOAT32_MAXNREG = None


def states_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the states per mini-batch are stored in (HALF_STATES)."""
    return q.dtype if HALF_STATES and q.dtype != torch.float32 else torch.float32


def launch_meta(q: torch.Tensor, chunk_size: int) -> dict:
    """The constexprs and warps every TTT kernel launches with (WALK_MIXED's MIXED apart)."""
    meta = mini_batch_meta(q, chunk_size)
    if FLOAT32_MAXNREG is not None and q.dtype == torch.float32:
        meta["maxnreg"] = FLOAT32_MAXNREG
    return meta


def walk_meta(q: torch.Tensor, chunk_size: int) -> dict:
    """launch_meta with WALK_MIXED as the kernels' MIXED argument ("" for None)."""
    return {**launch_meta(q, chunk_size), "MIXED": walk_mixed()}


def final_state_grads(q: torch.Tensor, dht, dhbt, N: int):
    """The gradients of the final W and hb as the backward kernels take them: float32 and
    contiguous, or both None; with one of the final states unused, zeros for its gradient."""
    H, D = q.shape[2], q.shape[3]
    if (dht is None) != (dhbt is None):
        dht = dht if dht is not None else q.new_zeros(N, H, D, D, dtype=torch.float32)
        dhbt = dhbt if dhbt is not None else q.new_zeros(N, H, 1, D, dtype=torch.float32)
    return (None if dht is None else dht.contiguous().float(),
            None if dhbt is None else dhbt.contiguous().float())


def unsupported(D: int, chunk_size: int) -> str | None:
    """Why the kernels cannot take head size D with mini-batches of chunk_size (None: they can)."""
    if D > MAX_D:
        return f"D must be <= {MAX_D}, got D={D}"
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}"
    return None


@triton.jit
def load_state(p_W, p_hb, i, o_s, m_s, o_d, m_d, D: tl.constexpr):
    """State i of a [.., D, D] weight and [.., D] bias pair, in float32."""
    return (load_square(p_W, i, o_s, m_s, D),
            tl.load(p_hb + i.to(tl.int64) * D + o_d, mask=m_d, other=0.).to(tl.float32))


@triton.jit
def start_state(p_W, p_hb, i, o_s, m_s, o_d, m_d, D: tl.constexpr, BD: tl.constexpr,
                GIVEN: tl.constexpr):
    """The W, hb [BD, BD], [BD] a walk starts from: state i of p_W, p_hb when GIVEN, else 0."""
    b_W = tl.zeros([BD, BD], dtype=tl.float32)
    b_hb = tl.zeros([BD], dtype=tl.float32)
    if GIVEN:
        b_W, b_hb = load_state(p_W, p_hb, i, o_s, m_s, o_d, m_d, D)
    return b_W, b_hb


@triton.jit
def mini_batch_rows(q, k, v, eta, row0, o_c, m_t, o_d, scale, D: tl.constexpr, H: tl.constexpr):
    """The mini-batch's rows in float32, zeros past the sequence: Q~ = scale Q, K, V, eta."""
    b_q = load_rows(q + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32) * scale
    b_k = load_rows(k + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_v = load_rows(v + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    return b_q, b_k, b_v, tl.load(eta + row0 + o_c * H, mask=m_t, other=0.).to(tl.float32)


@triton.jit
def walk_rows(q, k, v, eta, i_t, bos, L, i_h, o_c, o_d, scale, D: tl.constexpr,
              H: tl.constexpr, BC: tl.constexpr, WITH_Q: tl.constexpr):
    """Mini-batch i_t's rows as a walk takes them: (Q~ or K when not WITH_Q, K, V, eta), as
    mini_batch_rows."""
    row0 = (bos + i_t * BC) * H + i_h
    m_t = i_t * BC + o_c < L
    b_k = load_rows(k + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_v = load_rows(v + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    b_e = tl.load(eta + row0 + o_c * H, mask=m_t, other=0.).to(tl.float32)
    b_q = b_k
    if WITH_Q:
        b_q = load_rows(q + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32) * scale
    return b_q, b_k, b_v, b_e


def walk_mixed() -> str:
    """WALK_MIXED as the kernels' MIXED argument ("" for None)."""
    return WALK_MIXED or ""


def output_mixed() -> str:
    """OUTPUT_MIXED as the kernels' OMIXED argument ("" for None; float32 inputs take float32
    products under any mode)."""
    return OUTPUT_MIXED or ""


@triton.jit
def recon_grads(b_k, b_v, b_W, b_hb, b_w, b_b, m_t, m_d, D: tl.constexpr, eps,
                 HALF: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr):
    """(G, Z) [C, BD]: Z = K W + 1 hb and the reconstruction gradients G at the weights the
    mini-batch starts with, G 0 on the rows past the sequence."""
    b_z = dot_state(b_k, b_W, HALF, PRECISION, MIXED) + b_hb[None, :]
    b_g = ln_recon_grad_rows(b_z, b_v - b_k, b_w, b_b, m_d, D, eps)
    return tl.where(m_t[:, None], b_g, 0.), b_z


@triton.jit
def mini_batch_outputs(b_q, b_k, b_e, b_g, b_W, b_hb, b_w, b_b, o_c, m_d, D: tl.constexpr,
                       eps, HALF: tl.constexpr, PRECISION: tl.constexpr, OMIXED: tl.constexpr):
    """O [C, BD] = U + w * LN(U) + b, U = Q~ W + 1 hb - eta * ((tril(Q~ K^T) + tril(1)) G);
    Q~ K^T and Q~ W at PRECISION, or from Q~ rounded to the inputs' dtype HALF (OMIXED, a
    utils.dot_mixed mode for Q~ W: OUTPUT_MIXED)."""
    if OMIXED == "" or HALF == tl.float32:
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        b_qw = tl.dot(b_q, b_W, input_precision=PRECISION)
    else:
        b_qh = b_q.to(HALF)
        b_qk = tl.dot(b_qh, tl.trans(b_k.to(HALF)))
        b_qw = dot_mixed(b_qh, b_W, PRECISION, OMIXED)
    b_A = tl.where(o_c[:, None] >= o_c[None, :], b_qk + 1., 0.)
    b_u = (b_qw + b_hb[None, :] - b_e[:, None] * tl.dot(b_A, b_g, input_precision=PRECISION))
    b_x, _ = layer_norm_rows(b_u, m_d, D, eps)
    return b_u + b_w[None, :] * b_x + b_b[None, :]


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['h0'] is not None,
    'STORE_FINAL_STATE': lambda a: a['ht'] is not None,
    'STORE_STATES': lambda a: a['hs'] is not None,
    'WITH_OUTPUT': lambda a: a['o'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def fused_chunk_ttt_linear_fwd_kernel(
    q, k, v, w, b, eta, o, h0, hb0, ht, hbt, hs, hbs, cu_seqlens, chunk_offsets, scale, eps, T,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr, MIXED: tl.constexpr, OMIXED: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    STORE_STATES: tl.constexpr, WITH_OUTPUT: tl.constexpr, PREFETCH: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One sequence and head: the mini-batches in order (module docstring), W and hb on chip;
    with STORE_STATES the W and hb each mini-batch starts from (for the backward, and for
    chunk_ttt_linear's outputs: it walks without WITH_OUTPUT); with PREFETCH the next
    mini-batch's rows loaded ahead (WALK_PREFETCH)."""
    i_nh, i_h, bos, L, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b = walk_program(
        w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC, IS_VARLEN)
    o_c = tl.arange(0, BC)
    b_W, b_hb = start_state(h0, hb0, i_nh, o_s, m_s, o_d, m_d, D, BD, USE_INITIAL_STATE)
    if PREFETCH:
        b_q, b_k, b_v, b_e = walk_rows(q, k, v, eta, 0, bos, L, i_h, o_c, o_d, scale, D, H, BC,
                                       WITH_OUTPUT)
    for i_t in range(NT):
        if STORE_STATES:
            i_s = (c0 + i_t) * H + i_h
            tl.store(hs + i_s * D * D + o_s, b_W, mask=m_s)
            tl.store(hbs + i_s * D + o_d, b_hb, mask=m_d)
        row0 = (bos + i_t * BC) * H + i_h
        m_t = i_t * BC + o_c < L
        n_t = tl.minimum(BC, L - i_t * BC)
        if PREFETCH:
            n_q, n_k, n_v, n_e = walk_rows(q, k, v, eta, i_t + 1, bos, L, i_h, o_c, o_d, scale,
                                           D, H, BC, WITH_OUTPUT)
        else:
            b_q, b_k, b_v, b_e = walk_rows(q, k, v, eta, i_t, bos, L, i_h, o_c, o_d, scale, D,
                                           H, BC, WITH_OUTPUT)
        b_g, _ = recon_grads(b_k, b_v, b_W, b_hb, b_w, b_b, m_t, m_d, D, eps,
                             k.dtype.element_ty, PRECISION, MIXED)
        if WITH_OUTPUT:
            b_o = mini_batch_outputs(b_q, b_k, b_e, b_g, b_W, b_hb, b_w, b_b, o_c, m_d, D, eps,
                                     k.dtype.element_ty, PRECISION, OMIXED)
            store_rows(o + row0 * D, b_o, o_c, m_t, o_d, D, H)
        # W <- W - eta_last K^T G, hb <- hb - eta_last 1^T G (eta_last: the last real token's)
        e_last = tl.sum(tl.where(o_c == n_t - 1, b_e, 0.), 0)
        b_W -= e_last * dot_state(tl.trans(b_k), b_g, k.dtype.element_ty, PRECISION, MIXED)
        b_hb -= e_last * tl.sum(b_g, 0)
        if PREFETCH:
            b_q, b_k, b_v, b_e = n_q, n_k, n_v, n_e
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * D * D + o_s, b_W, mask=m_s)
        tl.store(hbt + i_nh.to(tl.int64) * D + o_d, b_hb, mask=m_d)


@triton.jit
def _mini_batch_bwd(b_q, b_k, b_v, b_e, b_do, b_W, b_hb, b_w, b_b, b_dW, b_dhb, m_t, n_t, o_c,
                    m_d, D: tl.constexpr, eps, HALF: tl.constexpr, PRECISION: tl.constexpr,
                    MIXED: tl.constexpr, q_rows, hs, i_s, o_d, o_s, m_s, scale,
                    H: tl.constexpr):
    """One mini-batch backward (the forward recomputed from its starting W, hb; b_q scaled):
    given dO and the gradients dW, dhb of the weights it hands on, (dQ~, dK, dV, deta, the
    gradients of the weights it starts from, dw, db). q_rows and state i_s of hs are where
    b_q and b_W came from (loaded again for the last products of the widest tiles:
    minibatch.reload_rows)."""
    causal = o_c[:, None] >= o_c[None, :]
    b_g, b_z = recon_grads(b_k, b_v, b_W, b_hb, b_w, b_b, m_t, m_d, D, eps, HALF, PRECISION,
                           MIXED)
    b_A = tl.where(causal, tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) + 1., 0.)
    b_ag = tl.dot(b_A, b_g, input_precision=PRECISION)
    b_u = tl.dot(b_q, b_W, input_precision=PRECISION) + b_hb[None, :] - b_e[:, None] * b_ag
    b_xu, b_su = layer_norm_rows(b_u, m_d, D, eps)
    # O = U + w * LN(U) + b
    b_dw = tl.sum(b_do * b_xu, 0)
    b_db = tl.sum(b_do, 0)
    b_du = b_do + layer_norm_bwd_rows(b_w[None, :] * b_do, b_xu, b_su, m_d, D)
    # W' = W - e_L K^T G, hb' = hb - e_L 1^T G
    last = o_c == n_t - 1
    e_last = tl.sum(tl.where(last, b_e, 0.), 0)
    # (<dW, K^T G> + dhb . 1^T G = sum(G o (K dW + 1 dhb)): no [D, D] product)
    b_kdw = tl.dot(b_k, b_dW, input_precision=PRECISION) + b_dhb[None, :]
    b_dg = -e_last * b_kdw
    de_last = -tl.sum(tl.sum(b_g * b_kdw, 1), 0)
    b_dk = -e_last * tl.dot(b_g, tl.trans(b_dW), input_precision=PRECISION)
    # U = Q~ W + 1 hb - e (A G),  A = tril(Q~ K^T + 1)
    b_dW += tl.dot(tl.trans(b_q), b_du, input_precision=PRECISION)
    b_dhb += tl.sum(b_du, 0)
    b_dag = -b_e[:, None] * b_du
    b_de = -tl.sum(b_du * b_ag, 1) + tl.where(last, de_last, 0.)
    b_dg += tl.dot(tl.trans(b_A), b_dag, input_precision=PRECISION)
    b_dA = tl.where(causal, tl.dot(b_dag, tl.trans(b_g), input_precision=PRECISION), 0.)
    b_dq = tl.dot(b_dA, b_k, input_precision=PRECISION)
    b_q = reload_rows(b_q, q_rows, o_c, m_t, o_d, scale, D, H, RELOAD_TILE)
    b_dk += tl.dot(tl.trans(b_dA), b_q, input_precision=PRECISION)
    # G = ln_recon_grad(Z, V - K),  Z = K W + 1 hb
    b_dz, b_dt, b_dw2, b_db2, _ = ln_recon_grad_bwd_rows(
        tl.where(m_t[:, None], b_dg, 0.), b_z, b_v - b_k, b_w, b_b, m_d, D, eps)
    b_W = reload_square(b_W, b_q, hs, i_s, o_s, m_s, D, RELOAD_TILE)
    b_dk += tl.dot(b_dz, tl.trans(b_W), input_precision=PRECISION) - b_dt
    b_dq += tl.dot(b_du, tl.trans(b_W), input_precision=PRECISION)
    b_dW += tl.dot(tl.trans(b_k), b_dz, input_precision=PRECISION)
    b_dhb += tl.sum(b_dz, 0)
    return b_dq, b_dk, b_dt, b_de, b_dW, b_dhb, b_dw + b_dw2, b_db + b_db2


@triton.heuristics({
    'USE_INITIAL_STATE': lambda a: a['dh0'] is not None,
    'USE_FINAL_STATE_GRADIENT': lambda a: a['dht'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def fused_chunk_ttt_linear_bwd_kernel(
    q, k, v, w, b, eta, do, hs, hbs, dht, dhbt, dq, dk, dv, deta, dw, db, dh0, dhb0,
    cu_seqlens, chunk_offsets, scale, eps, T,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
    PRECISION: tl.constexpr, MIXED: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One sequence and head: the mini-batches from last to first, each from the W, hb the
    forward stored for it, dW and dhb carried on chip; dw, db per (sequence, head)."""
    i_nh, i_h, bos, L, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b = walk_program(
        w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC, IS_VARLEN)
    o_c = tl.arange(0, BC)
    b_dW, b_dhb = start_state(dht, dhbt, i_nh, o_s, m_s, o_d, m_d, D, BD,
                              USE_FINAL_STATE_GRADIENT)
    b_dwa = tl.zeros([BD], dtype=tl.float32)
    b_dba = tl.zeros([BD], dtype=tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        row0 = (bos + i_t * BC) * H + i_h
        m_t = i_t * BC + o_c < L
        n_t = tl.minimum(BC, L - i_t * BC)
        i_s = (c0 + i_t) * H + i_h
        b_W, b_hb = load_state(hs, hbs, i_s, o_s, m_s, o_d, m_d, D)
        b_q, b_k, b_v, b_e = mini_batch_rows(q, k, v, eta, row0, o_c, m_t, o_d, scale, D, H)
        b_do = load_rows(do + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
        b_dq, b_dk, b_dv, b_de, b_dW, b_dhb, b_dw, b_db = _mini_batch_bwd(
            b_q, b_k, b_v, b_e, b_do, b_W, b_hb, b_w, b_b, b_dW, b_dhb, m_t, n_t, o_c, m_d, D,
            eps, k.dtype.element_ty, PRECISION, MIXED, q + row0 * D, hs, i_s, o_d, o_s, m_s,
            scale, H)
        b_dwa += b_dw
        b_dba += b_db
        store_rows(dq + row0 * D, b_dq * scale, o_c, m_t, o_d, D, H)
        store_rows(dk + row0 * D, b_dk, o_c, m_t, o_d, D, H)
        store_rows(dv + row0 * D, b_dv, o_c, m_t, o_d, D, H)
        tl.store(deta + row0 + o_c * H, b_de.to(deta.dtype.element_ty), mask=m_t)
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * D * D + o_s, b_dW, mask=m_s)
        tl.store(dhb0 + i_nh.to(tl.int64) * D + o_d, b_dhb, mask=m_d)
    tl.store(dw + i_nh * D + o_d, b_dwa, mask=m_d)
    tl.store(db + i_nh * D + o_d, b_dba, mask=m_d)


def run_forward(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0, output_final_state,
             cu_seqlens, keep_states: bool, with_output: bool = True):
    """(o or None, final W, final hb, W and hb at each mini-batch's start or None, None);
    inputs checked and contiguous, h0 and hb0 both given or both None."""
    B, T, H, D = q.shape
    N, NT, _, chunk_offsets = chunk_layout(B, T, cu_seqlens, chunk_size)
    chunks = NT * (B if cu_seqlens is None else 1)
    o = torch.empty_like(v) if with_output else None
    f32 = dict(dtype=torch.float32, device=q.device)
    ht = torch.empty(N, H, D, D, **f32) if output_final_state else None
    hbt = torch.empty(N, H, 1, D, **f32) if output_final_state else None
    hs = (torch.empty(chunks, H, D, D, dtype=states_dtype(q), device=q.device) if keep_states
          else None)
    hbs = torch.empty(chunks, H, D, **f32) if keep_states else None
    fused_chunk_ttt_linear_fwd_kernel[(N * H,)](
        q, k, v, w, b, eta, o, h0, hb0, ht, hbt, hs, hbs, cu_seqlens, chunk_offsets, scale,
        float(eps), T, PREFETCH=WALK_PREFETCH, OMIXED=output_mixed() if with_output else "",
        **walk_meta(q, chunk_size))
    return o, ht, hbt, hs, hbs


def run_backward(q, k, v, w, b, eta, hs, hbs, h0, do, dht, dhbt, scale, eps, chunk_size,
              cu_seqlens):
    """(dq, dk, dv, dw, db, deta, d initial W or None, d initial hb or None)."""
    B, T, H, D = q.shape
    N, _, _, chunk_offsets = chunk_layout(B, T, cu_seqlens, chunk_size)
    dht, dhbt = final_state_grads(q, dht, dhbt, N)
    dq, dk, dv, deta = (torch.empty_like(x) for x in (q, k, v, eta))
    f32 = dict(dtype=torch.float32, device=q.device)
    dw, db = torch.empty(N, H, D, **f32), torch.empty(N, H, D, **f32)
    dh0 = None if h0 is None else torch.empty(N, H, D, D, **f32)
    dhb0 = None if h0 is None else torch.empty(N, H, 1, D, **f32)
    fused_chunk_ttt_linear_bwd_kernel[(N * H,)](
        q, k, v, w, b, eta, do.contiguous().to(v.dtype), hs, hbs, dht, dhbt, dq, dk, dv, deta,
        dw, db, dh0, dhb0, cu_seqlens, chunk_offsets, scale, float(eps), T, MIXED=walk_mixed(),
        num_stages=BWD_STAGES, **launch_meta(q, chunk_size))
    return dq, dk, dv, dw.sum(0).to(w.dtype), db.sum(0).to(b.dtype), deta, dh0, dhb0


class FusedChunkTTTFunction(torch.autograd.Function):
    """Forward by ``run_forward`` keeping the states, backward by ``ctx.run_backward``: this
    module's run_backward, or chunk_ttt_linear's (which subclasses this)."""

    @staticmethod
    def forward(ctx, q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0, output_final_state,
                cu_seqlens):
        o, ht, hbt, hs, hbs = run_forward(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0,
                                       output_final_state, cu_seqlens, keep_states=True)
        return save_for_backward(ctx, run_backward, (o, ht, hbt, hs, hbs), q, k, v, w, b, eta,
                                 scale, eps, chunk_size, h0, hb0, cu_seqlens)

    @staticmethod
    def backward(ctx, do, dht, dhbt):
        q, k, v, w, b, eta, hs, hbs, h0, hb0, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dw, db, deta, dh0, dhb0 = ctx.run_backward(
            q, k, v, w, b, eta, hs, hbs, h0, do, dht, dhbt, ctx.scale, ctx.eps, ctx.chunk_size,
            cu_seqlens)
        return (dq, dk, dv, dw, db, deta, None, None, None,
                None if dh0 is None else dh0.to(h0.dtype),
                None if dhb0 is None else dhb0.to(hb0.dtype), None, None)


def save_for_backward(ctx, backward, results, q, k, v, w, b, eta, scale, eps, chunk_size, h0,
                      hb0, cu_seqlens):
    """Keep what FusedChunkTTTFunction.backward needs; returns (o, final W, final hb) of the
    forward's ``results`` (o, ht, hbt, hs, hbs)."""
    o, ht, hbt, hs, hbs = results
    ctx.save_for_backward(q, k, v, w, b, eta, hs, hbs, h0, hb0, cu_seqlens)
    ctx.scale, ctx.eps, ctx.chunk_size, ctx.run_backward = scale, eps, chunk_size, backward
    return o, ht, hbt


def checked_inputs(name: str, q, k, v, w, b, eta, scale, eps, chunk_size, initial_state,
                   initial_state_bias, output_final_state, cu_seqlens):
    """(q, k, v, w, b, eta, scale, h0, hb0, needs a backward): the arguments checked (a clear
    error naming ``name`` before any launch), made contiguous, the scale resolved; of the two
    initial states, one given alone gets zeros for the other."""
    dims = TTT.validate(dict(
        q=q, k=k, v=v, w=w, b=b, eta=eta, scale=scale, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, initial_state_bias=initial_state_bias,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens))
    check_launchable(name, q)
    why = unsupported(dims["D"], chunk_size)
    if why:
        raise ValueError(f"{name}: {why}")
    B, T, H, D = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, w, b, eta = (x.contiguous() for x in (q, k, v, w, b, eta))
    h0 = None if initial_state is None else initial_state.contiguous()
    hb0 = None if initial_state_bias is None else initial_state_bias.contiguous()
    if (h0 is None) != (hb0 is None):
        h0 = h0 if h0 is not None else q.new_zeros(N, H, D, D, dtype=torch.float32)
        hb0 = hb0 if hb0 is not None else q.new_zeros(N, H, 1, D, dtype=torch.float32)
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (
        q, k, v, w, b, eta, h0, hb0))
    return q, k, v, w, b, eta, TTT.resolve_scale(scale, dims), h0, hb0, grad


def fused_chunk_ttt_linear(
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
    """TTT-Linear in one program per sequence and head (Triton). q, k, v [B,T,H,D];
    w, b [H,D]; eta [B,T,H,1]; initial_state [N,H,D,D], initial_state_bias [N,H,1,D]. Returns
    o [B,T,H,D] in v's dtype and the final weights [N,H,D,D] and bias [N,H,1,D] in float32
    (None, None unless output_final_state). D <= 128, chunk_size 16, 32 or 64. Forward and
    backward: gradients for q, k, v, w, b, eta and both initial states."""
    q, k, v, w, b, eta, scale, h0, hb0, grad = checked_inputs(
        "fused_chunk_ttt_linear", q, k, v, w, b, eta, scale, eps, chunk_size, initial_state,
        initial_state_bias, output_final_state, cu_seqlens)
    if grad:
        return FusedChunkTTTFunction.apply(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0,
                                           output_final_state, cu_seqlens)
    o, ht, hbt, _, _ = run_forward(q, k, v, w, b, eta, scale, eps, chunk_size, h0, hb0,
                                output_final_state, cu_seqlens, keep_states=False)
    return o, ht, hbt
