"""chunk_titans_linear's backward (docs/operators.md section 4), in three kernels, as
chunk_ttt_linear's: only what depends on the gradients dM', dS' of the memory and momentum a
mini-batch hands on is in the sequential walk; the rest comes from parallel kernels before and
after it. The forward (kernels/titans/chunk.py, its module docstring) is recomputed from the
M0, S0 it stored for each mini-batch.

1. ``chunk_titans_linear_bwd_local_kernel``, one program per (mini-batch, head): Z, G, P, U
   recomputed, then back through O and U:

       dU = dO + LN's backward of w dO,          W = (P theta^T) o (Q~ K^T),
       dW = -tril(dU G^T),                       dG_U = -W^T dU,
       dQ~ = f0 dU M0^T + p0 dU S0^T + (dW o P theta^T) K  (final),   dK_W = (dW o P theta^T)^T Q~,
       dP = dW o theta^T o (Q~ K^T),  dp0 = rowsum(dU o (Q~ S0)),  df0 = rowsum(dU o (Q~ M0)),
       dtheta_U = colsum(dW o P o (Q~ K^T)),  dw, db of the output's LayerNorm

   storing Z, dU, dG_U, dK_W [C, D], dP [C, C] and per row cM = P[n] theta, cS = E[n] theta,
   f0, p0, e0, dp0, df0, dtheta_U (the columns of ``gr``, ROW_* below).
2. ``chunk_titans_linear_bwd_walk_kernel`` (kernels/titans/walk_bwd.py), one program per
   (sequence, head), mini-batches from last to first, dM' and dS' on chip and stored per
   mini-batch (as the forward stores M0, S0); or, by WALK_SLICES, two programs per (sequence,
   head) each holding half of the columns of dM' and dS' (walk_bwd.py's docstring):

       dG = dG_U - cM o (K dM') - cS o (K dS'),   dcM = -rowsum(G o K dM'), dcS likewise
       dZ, dV, dw, db = the backward of G = 2 ln_recon_grad(Z, V - K)
       dM = f0[n] dM' + Q~^T (f0 o dU) + K^T dZ,  dS = p0[n] dM' + e0[n] dS' + Q~^T (p0 o dU)

   writing G over dU, dZ over dG_U, dK_W - dV over dK_W, and dcM, dcS into ``gr``.
3. ``chunk_titans_linear_bwd_gates_kernel``, one program per (mini-batch, head):

       dK = dK_W - dV + dZ M0^T - (cM o G) dM'^T - (cS o G) dS'^T
       dtheta = dtheta_U + dcM o P[n] + dcS o E[n]
       df0[n] = <dM', M0>, dp0[n] = <dM', S0>, de0[n] = <dS', S0>, dP[n] = dcM o theta,
       dE[n] = dcS o theta: with dP, dp0, df0 into the segment products' backward
       (stages.segment_products_bwd: no factor divided by, zero factors included).

dw and db are summed per mini-batch and per (sequence, head), then on the host. Rows past a
sequence load as zeros (G 0, factors 1, theta 0) and store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common.minibatch import (load_square_cols, load_square_cols_scaled,
                                      load_square_rows, load_square_rows_scaled,
                                      mini_batch_program, reload_rows, with_warps)
from kernels.common.utils import chunk_layout, load_rows, mode_for, store_rows
from kernels.titans.stages import (NG, ROW_CM, ROW_CS, ROW_DCM, ROW_DCS, ROW_DF0, ROW_DP0,
                                   ROW_DTH, ROW_E0, ROW_F0, ROW_P0, dot_at, dot_q, dq_state,
                                   gate_rows, gates_bwd, gr_col, hand_on_gates, load_states,
                                   local_meta, mini_batch_rows, outputs_bwd_from,
                                   segment_products, store_gr_col, store_moments,
                                   stored_grads)
from kernels.titans.walk_bwd import (chunk_titans_linear_bwd_walk_cols_kernel,
                                     chunk_titans_linear_bwd_walk_kernel)

__all__ = ["chunk_backward"]

# The walk's loads: the next mini-batch's rows loaded before this one's products (True), or
# each mini-batch's when it starts (False); chunk.WALK_PREFETCH for the forward walk. At D = 128
# the walk took 10,122 µs with, 12,070 without (H100, bfloat16, B=2, H=16, T = 8K, 2026-12-07,
# one run; python tools/kernel_profile.py titans chunk --seq-len 8192 --head-dim 128 --mode
# fwdbwd --set "np:kernels.titans.chunk_bwd.PREFETCH=False").
PREFETCH = True
# The walk's warps: None for mini_batch_meta's (4 at D <= 64, else 8), or a number. At 4 warps
# and D = 64 ptxas spilled 1,236 bytes a thread; on an H100 (bfloat16, B=2, H=16, T=8192,
# 2026-12-06, python tools/kernel_profile.py titans chunk --mode fwdbwd) 8 warps took the walk
# from 4,196 to 2,798 µs at D = 64, and 16 from 9,869 to 15,416 at D = 128 (the forward walk at
# 8 warps: 1,369 to 1,466 µs at D = 64, chunk.WALK_WARPS stays None), the walks' products
# then in one TF32 product (chunk.WALK_MIXED "tf32"; 2,710 at 8 warps under today's modes).
WALK_WARPS = 8
# The walk by column slices (walk_bwd.chunk_titans_linear_bwd_walk_cols_kernel): BD -> how
# many programs take a (sequence, head)'s dM', dS', each [BD, BD / slices] columns of them,
# swapping seven per-row partial sums once a mini-batch; a BD it does not name takes the
# one-program walk (walk_bwd.chunk_titans_linear_bwd_walk_kernel). With 1 the walk by columns
# runs whole, the form the CPU tests check its math by (at D = 128 with 64-token mini-batches
# it needs more shared memory than sm_90 has: ptxas, 334,336 bytes in bfloat16). On an H100
# (bfloat16, B=2, H=16, D = 128, T = 8K, fwd+bwd, 2026-12-07; python tools/kernel_profile.py
# titans chunk --seq-len 8192 --head-dim 128 --mode fwdbwd --set
# "pair:kernels.titans.chunk_bwd.WALK_SLICES={128:2}")
# the walk took 10,639 µs whole and 5,286 as a pair (ptxas: 1,188 bytes of spill a thread
# against 308), the step 20,689 against 15,135; the tiling family's D = 100 and 128 classes
# passed with it in bfloat16 and float16 (with its prefetch) and float32 (without; reports/
# titans.md). Untimed and unchecked: more pairs than the GPU holds at once (2 N H programs
# past its resident limit), where pairs take the free slots in turn (minibatch.step_wait).
WALK_SLICES = {128: 2}
# The most slices a walk of CPU tensors takes (more: the one-program walk): Triton's
# interpreter runs a launch's programs one after another, where the first of a pair would wait
# for the second forever.
# harness compile, which records launches without running them, sets 2 (a registered switch
# of harness/impls/titans.py) so that the GPU's form is compiled too.
CPU_WALK_SLICES = 1
# The walk by columns' loads, as PREFETCH: in the same run as WALK_SLICES's the pair took
# 5,286 µs with its prefetch and 4,957 without (ptxas: 308 bytes of spill a thread against
# 72), the step 15,135 against 14,963.
COLS_PREFETCH = False
# How the walk hands dM', dS' back: each product accumulated into the rest of its sum (tl.dot's
# acc, the scale on dU's rows; True), or formed apart and then added (False); as
# chunk.WALK_ACCUMULATE. In bfloat16 the loop issues 1,262 instructions a mini-batch against
# 1,271 at D = 64, 2,971 against 3,164 at D = 128, where ptxas spills 1,236 bytes a thread
# against 1,428 (tools/kernel_registers.py titans --case basic | partial-200 --kernel bwd_walk
# --ptx DIR --set "acc:kernels.titans.chunk_bwd.WALK_ACCUMULATE=True", tools/sass_loop.py).
# Slower on an H100 (bfloat16, B=2, H=16, T = 8K, chunk.WALK_MIXED "split_trunc", one run,
# 2026-12-06, tools/kernel_profile.py titans chunk --mode fwdbwd --set ...): the walk 2,719 µs
# against 2,581 at D = 64, 11,365 against 10,084 at D = 128.
WALK_ACCUMULATE = False
# The last kernel's products (dZ M0^T, (cM o G) dM'^T, (cS o G) dS'^T, and the gates' [C, C]
# ones) take float32 operands exactly ("ieee", FMA loops), at 8 warps; DK_PRECISION below
# for the dK products of half-precision inputs.
# Under three TF32 passes at 4 warps ptxas gave its bfloat16 form 32 registers and 17,880 bytes
# of spill stores a thread (sm_90, D = 64; python tools/kernel_registers.py titans --impl
# chunk --kernel gates), and it took 21.2 ms of a 28.1 ms fwd+bwd step (H200, bfloat16, B=2,
# H=16, D=64, T=8192); with a .maxnreg of 255 it still spilled 4,512 bytes, at 8 warps 3,880;
# exact products at 8 warps: 128 registers and no spill. At D = 128 ptxas gave the exact form
# 32 registers and 15,128 bytes of spill stores on its own, 5,508 with a .maxnreg of 255
# (GATES_MAXNREG; None leaves the choice to ptxas; at D = 64: 182 registers, no spill). Its
# four [D, D] states alone fill 256 registers a thread at D = 128. For bfloat16 its dK
# products take one TF32 product since (DK_PRECISION), and there 4 warps (GATES_WARPS_TF32) at
# D <= 64 took the kernel from 1,299 to 769 µs (H100, bfloat16, B=2, H=16, D=64, T=8192,
# 2026-12-06, kernel_profile; the tiling family's 13 classes up to 128 x 32 passed in bfloat16
# and float16 at 4 warps, worst 26% of a tolerance). Untimed at D = 128 and for exact products:
# 8 warps there.
GATES_WARPS = 8
GATES_WARPS_TF32 = 4
GATES_MAXNREG = 255
# The input_precision of the last kernel's dK products (dZ M0^T, (cM o G) dM'^T,
# (cS o G) dS'^T, all float32 operands) for half-precision inputs: None ("ieee", as above), a
# Triton input_precision ("tf32": one TF32 product, both operands kept to 11 bits; "tf32x3":
# three passes), or a dict per dtype as chunk.WALK_MIXED. float32 inputs stay "ieee"; the
# gates' [C, C] products stay "ieee" in every form. On an H100 (bfloat16, B=2, H=16, D=64,
# T=8192, 2026-12-06; python tools/kernel_profile.py titans chunk --seq-len 8192 --head-dim 64
# --mode fwdbwd) "tf32" took the kernel from 2,629 to 1,287 µs and the fwd+bwd step from 9,750
# to 8,401; in the bfloat16 tiling family (13 classes) dK's error moved 0.87x to 1.08x, its
# worst 23.8% of the tolerance (24.2% before), and no other quantity moved. float16 keeps
# "ieee": with its products as bfloat16's it failed its tiling family (chunk.WALK_MIXED).
DK_PRECISION = {"bfloat16": "tf32"}
# The last kernel takes the states [D, D] whole where chunk_size * D * D is at most GATES_WHOLE,
# else GATES_ROWS rows at a time. Whole, its four states and rows needed 163,840 bytes of shared
# memory in bfloat16 with 64-token mini-batches at D = 64 and 225,280 with 16-token ones at
# D = 128, but 262,144 with 32-token ones and 294,912 with 64-token ones at D = 128 (sm_90
# allows 232,448; python tools/kernel_registers.py titans --case cs32-d128 --kernel bwd_gates);
# by rows, 114,688 with 32-token ones. Where both fit, whole is faster: with 16-token ones at
# D = 128 the kernel took 4,068 µs whole, 5,469 by 32 rows and 4,719 by 64 (H100, bfloat16,
# B=2, H=16, T=8192, 2026-12-06; kernel_profile with --set GATES_WHOLE=131072).
GATES_ROWS = 32
GATES_WHOLE = 16 * 128 * 128
# Where a mini-batch's [C, D] tiles hold more than RELOAD_TILE values (64-token mini-batches at
# D = 128 only) the first kernel takes Q~ and K loaded again after its products with M0 and S0
# (minibatch.reload_rows), and dQ~'s terms through the states STATE_COLS columns at a time from
# dU as it stored it; it needed 327,680 bytes of shared memory in bfloat16 without, 262,144 with
# the states loaded again whole for those terms.
RELOAD_TILE = tl.constexpr(64 * 64)
STATE_COLS = tl.constexpr(32)
# How the first kernel takes Q~ M0, Q~ S0 and Q~ K^T for half-precision inputs: as the forward's
# outputs kernel does under chunk.OUTPUT_MIXED (stages.dot_q: Q's own rows, the same U bit for
# bit; True), or of float32 operands at PRECISION (False). Tiles past RELOAD_TILE take PRECISION
# either way (their loads are placed for shared memory). On an H100 (as WALK_WARPS) it took the
# kernel from 1,174 to 1,056 µs at D = 64 and from 9,738 to 5,603 at D = 128.
LOCAL_AS_OUTPUTS = True
# The dtype in which the walk stores dM', dS' per mini-batch for the last kernel: None for
# float32, or "float16" (per dtype as chunk.WALK_MIXED), each row scaled by a power of two as
# chunk.HALF_STATES stores the forward's states (minibatch.store_square_scaled: every value
# keeps float16's 11 bits, as many as the last kernel's one-TF32 dK products take of them).
# H100, bfloat16, B=2, H=16, T=8K, fwd+bwd, 2026-12-07 (tools/switch_compare.py titans chunk
# --no-registered --mode fwdbwd --set "hg:...HALF_GRADS='float16'" ..., reports/titans.md):
# D = 64 6.177 / 6.097 ms against 6.007 / 6.008, D = 128 23.13 against 23.37; peak memory
# 1,204 MB against 1,452 at D = 64; gate-saturated dK 6.78e-3 against 6.69e-3. The walk's
# scaling costs what the halved traffic saves, so it stays off.
HALF_GRADS = None
@triton.jit
def _state_cols(p, p_r, i_s, o_d, m_d, o_k, D: tl.constexpr, SCALED: tl.constexpr):
    """Columns o_k of state i_s as the forward stored it (SCALED: float16 rows times p_r's
    inverse scales), in float32."""
    if SCALED:
        return load_square_cols_scaled(p, p_r, i_s, o_d, m_d, o_k, D)
    return load_square_cols(p, i_s, o_d, m_d, o_k, D)


@triton.jit
def _dq_states_by_blocks(p_du, hs, ss, hr, sr, i_s, b_f0, b_p0, o_c, m_t, o_d, m_d,
                         D: tl.constexpr, H: tl.constexpr, BD: tl.constexpr,
                         PRECISION: tl.constexpr, SCALED: tl.constexpr):
    """dQ~'s terms through the states, (f0 o dU) M0^T + (p0 o dU) S0^T, summed over blocks of
    STATE_COLS of dU's columns (read back from p_du, which the program has just written) and
    of the states' columns: no [D, D] state and no whole row tile as an operand."""
    tl.debug_barrier()  # every thread's dU rows are written before any thread reads them back
    b_dq = tl.zeros([o_c.shape[0], BD], dtype=tl.float32)
    for k0 in tl.static_range(0, BD, STATE_COLS):
        o_k = k0 + tl.arange(0, STATE_COLS)
        b_du = load_rows(p_du, o_c, m_t, o_k, D, H)
        b_M = _state_cols(hs, hr, i_s, o_d, m_d, o_k, D, SCALED)
        b_S = _state_cols(ss, sr, i_s, o_d, m_d, o_k, D, SCALED)
        b_dq += dot_at(b_f0[:, None] * b_du, tl.trans(b_M), PRECISION)
        b_dq += dot_at(b_p0[:, None] * b_du, tl.trans(b_S), PRECISION)
    return b_dq


@triton.heuristics({
    'SCALED': lambda a: a['hr'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_bwd_local_kernel(
    q, k, v, w, b, theta, alpha, eta, do, hs, ss, hr, sr, dq, z, du, dgu, dka, dP, gr, dw, db,
    cu_seqlens, chunk_indices, scale, eps, T, H: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr,
    OMIXED: tl.constexpr, Z_STORED: tl.constexpr, MOMENTS: tl.constexpr, SCALED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: the gradients that do not depend on the later mini-batches
    (step 1 of the module docstring); Q~'s products as stages.dot_q under OMIXED. SCALED: the
    states as the forward stored them under chunk.HALF_STATES_BACKWARD (float16 rows times
    hr's, sr's inverse scales), with Z_STORED: Z = K M0 taken from z, where the forward's walk
    stored it, instead of formed here and stored there; MOMENTS: G's LayerNorm moments stored
    for the walk by columns (stages.store_moments)."""
    i_s, row0, o_c, m_t, n_t, o_d, m_d, o_s, m_s, b_w, b_b = mini_batch_program(
        w, b, cu_seqlens, chunk_indices, T, H, D, BD, BC, IS_VARLEN)
    b_M, b_S = load_states(hs, ss, hr, sr, i_s, o_d, m_d, o_s, m_s, D, SCALED)
    b_q, b_k, b_v, b_th, b_a, b_e = mini_batch_rows(q, k, v, theta, alpha, eta, row0, o_c, m_t,
                                                    o_d, scale, D, H)
    b_do = load_rows(do + row0 * D, o_c, m_t, o_d, D, H).to(tl.float32)
    # the products with M0 and S0 first, one state at a time (Q~ M0, Z = K M0, then Q~ S0);
    # past RELOAD_TILE the later products take Q~ and K loaded again: the compiler places a
    # loaded tile's shared-memory copies at its load, so those of the first loads would live
    # beside the states' copies
    b_qh = load_rows(q + row0 * D, o_c, m_t, o_d, D, H)
    b_qm = dot_q(b_q, b_qh, b_M, scale, PRECISION, OMIXED)
    b_g, b_z = stored_grads(b_k, b_v, b_M, z, row0, o_c, m_t, o_d, m_d, b_w, b_b, D, H, eps,
                            k.dtype.element_ty, PRECISION, MIXED, Z_STORED)
    if MOMENTS:  # for the walk by columns
        store_moments(gr, row0, o_c, m_t, H, b_z, b_v - b_k, b_w, b_b, m_d, D, eps)
    b_qs = dot_q(b_q, b_qh, b_S, scale, PRECISION, OMIXED)
    b_q = reload_rows(b_q, q + row0 * D, o_c, m_t, o_d, scale, D, H, RELOAD_TILE)
    b_k = reload_rows(b_k, k + row0 * D, o_c, m_t, o_d, 1., D, H, RELOAD_TILE)
    b_F, b_f0, _, _ = segment_products(b_a, o_c)
    b_E, b_e0, _, _ = segment_products(b_e, o_c)
    (b_du, b_dq, b_dk, b_dg, b_dP, b_p0, b_dp0, b_df0, b_dth, b_dw,
     b_db) = outputs_bwd_from(b_q, b_k, b_g, b_do, b_qm, b_qs, dot_at(b_F, b_E, PRECISION),
                              dot_q(b_q, b_qh, tl.trans(b_k.to(b_qh.dtype)), scale, PRECISION,
                                    OMIXED),
                              b_th, b_F, b_f0, b_e0, b_w, b_b, o_c, m_d, D, eps, PRECISION)
    store_rows(du + row0 * D, b_du, o_c, m_t, o_d, D, H)
    if BC * BD > RELOAD_TILE:
        b_dq += _dq_states_by_blocks(du + row0 * D, hs, ss, hr, sr, i_s, b_f0, b_p0, o_c, m_t,
                                     o_d, m_d, D, H, BD, PRECISION, SCALED)
    else:
        b_dq += dq_state(b_du, b_f0, b_M, PRECISION) + dq_state(b_du, b_p0, b_S, PRECISION)
    b_pn, b_en, _, _, _ = hand_on_gates(b_F, b_f0, b_E, b_e0, o_c == n_t - 1)
    tl.store(dw + i_s * D + o_d, b_dw, mask=m_d)
    tl.store(db + i_s * D + o_d, b_db, mask=m_d)
    store_rows(dq + row0 * D, b_dq * scale, o_c, m_t, o_d, D, H)
    if not Z_STORED:
        store_rows(z + row0 * D, b_z, o_c, m_t, o_d, D, H)
    store_rows(dgu + row0 * D, b_dg, o_c, m_t, o_d, D, H)
    store_rows(dka + row0 * D, b_dk, o_c, m_t, o_d, D, H)
    tl.store(dP + i_s.to(tl.int64) * BC * BC + o_c[:, None] * BC + o_c[None, :], b_dP)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_CM, b_pn * b_th)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_CS, b_en * b_th)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_F0, b_f0)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_P0, b_p0)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_E0, b_e0)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_DP0, b_dp0)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_DF0, b_df0)
    store_gr_col(gr, row0, o_c, m_t, H, ROW_DTH, b_dth)


@triton.jit
def _square_rows(p, p_r, i_s, o_j, o_d, m_d, D: tl.constexpr, SCALED: tl.constexpr):
    """Rows o_j of the state (M0, S0) or gradient (dM', dS') stored for mini-batch i_s, in
    float32 (SCALED: float16 rows times p_r's inverse scales)."""
    if SCALED:
        return load_square_rows_scaled(p, p_r, i_s, o_j, o_d, m_d, D)
    return load_square_rows(p, i_s, o_j, o_d, m_d, D)


@triton.heuristics({
    'SCALED': lambda a: a['dmr'] is not None,
    'STATES_SCALED': lambda a: a['hr'] is not None,
    'IS_VARLEN': lambda a: a['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def chunk_titans_linear_bwd_gates_kernel(
    w, b, theta, alpha, eta, hs, ss, hr, sr, dms, dss, dmr, dsr, g, dz, dka, dP, gr, dk, dtheta,
    dalpha, deta, cu_seqlens, chunk_indices, T, H: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr, ROWS: tl.constexpr,
    PRECISION: tl.constexpr, DK_PRECISION: tl.constexpr, SCALED: tl.constexpr,
    STATES_SCALED: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One mini-batch and head: dK, dtheta, dalpha, deta (step 3 of the module docstring),
    the states BJ rows at a time (ROWS: BJ < BD, a flag so that harness.compile tells the two
    forms apart as code paths, each with its own largest launch); dM', dS' as the walk stored
    them (SCALED: float16 rows times dmr's, dsr's inverse scales), M0, S0 as the forward did
    (STATES_SCALED: hr's, sr's; chunk.HALF_STATES_BACKWARD)."""
    i_s, row0, o_c, m_t, n_t, o_d, m_d, o_s, m_s, _, _ = mini_batch_program(
        w, b, cu_seqlens, chunk_indices, T, H, D, BD, BC, IS_VARLEN)
    last = o_c == n_t - 1
    b_th, b_a, b_e = gate_rows(theta, alpha, eta, row0, o_c, m_t, H)
    b_F, b_f0, b_Fx, b_f0x = segment_products(b_a, o_c)
    b_E, b_e0, b_Ex, b_e0x = segment_products(b_e, o_c)
    b_pn, b_en, _, _, _ = hand_on_gates(b_F, b_f0, b_E, b_e0, last)
    b_g = load_rows(g + row0 * D, o_c, m_t, o_d, D, H)
    b_dz = load_rows(dz + row0 * D, o_c, m_t, o_d, D, H)
    b_gm = (b_pn * b_th)[:, None] * b_g
    b_gs = (b_en * b_th)[:, None] * b_g
    # the four states a block of BJ rows at a time: dK's columns o_j and <dM', M0>, <dM', S0>,
    # <dS', S0> summed over the blocks
    b_mm, b_ms, b_ss = 0., 0., 0.
    for j0 in tl.static_range(0, BD, BJ):
        o_j = j0 + tl.arange(0, BJ)
        b_M = _square_rows(hs, hr, i_s, o_j, o_d, m_d, D, STATES_SCALED)
        b_dM = _square_rows(dms, dmr, i_s, o_j, o_d, m_d, D, SCALED)
        b_dS = _square_rows(dss, dsr, i_s, o_j, o_d, m_d, D, SCALED)
        b_dk = (load_rows(dka + row0 * D, o_c, m_t, o_j, D, H)
                + dot_at(b_dz, tl.trans(b_M), DK_PRECISION)
                - dot_at(b_gm, tl.trans(b_dM), DK_PRECISION)
                - dot_at(b_gs, tl.trans(b_dS), DK_PRECISION))
        store_rows(dk + row0 * D, b_dk, o_c, m_t, o_j, D, H)
        b_S = _square_rows(ss, sr, i_s, o_j, o_d, m_d, D, STATES_SCALED)
        b_mm += tl.sum(tl.sum(b_dM * b_M, 1), 0)
        b_ms += tl.sum(tl.sum(b_dM * b_S, 1), 0)
        b_ss += tl.sum(tl.sum(b_dS * b_S, 1), 0)
    b_dcm = gr_col(gr, row0, o_c, m_t, H, ROW_DCM)
    b_dcs = gr_col(gr, row0, o_c, m_t, H, ROW_DCS)
    p = row0 + o_c * H
    tl.store(dtheta + p, (gr_col(gr, row0, o_c, m_t, H, ROW_DTH) + b_dcm * b_pn
                          + b_dcs * b_en).to(dtheta.dtype.element_ty), mask=m_t)
    b_da, b_de = gates_bwd(
        tl.load(dP + i_s.to(tl.int64) * BC * BC + o_c[:, None] * BC + o_c[None, :]),
        gr_col(gr, row0, o_c, m_t, H, ROW_DP0), gr_col(gr, row0, o_c, m_t, H, ROW_DF0),
        b_dcm * b_th, b_ms, b_dcs * b_th, b_mm, b_ss, b_F, b_E, b_e0, b_Fx, b_f0x, b_Ex, b_e0x,
        last, o_c, PRECISION)
    tl.store(dalpha + p, (-b_da).to(dalpha.dtype.element_ty), mask=m_t)
    tl.store(deta + p, b_de.to(deta.dtype.element_ty), mask=m_t)


def dk_precision(dtype: torch.dtype) -> str:
    """DK_PRECISION for inputs of ``dtype``: "ieee" for float32 and where it says None."""
    return ("" if dtype == torch.float32 else mode_for(DK_PRECISION, dtype)) or "ieee"


def gates_warps(dtype: torch.dtype, BD: int) -> int:
    """The last kernel's warps: GATES_WARPS_TF32 where its dK products take one TF32 product at
    D <= 64, else GATES_WARPS."""
    return GATES_WARPS_TF32 if dk_precision(dtype) == "tf32" and BD <= 64 else GATES_WARPS


def walk_slices(BD: int, device: torch.device, half: bool) -> int:
    """The programs per (sequence, head) of the backward walk by columns (WALK_SLICES), or 0 for
    the one-program walk: under HALF_GRADS (rows scaled by their largest value: whole rows),
    where WALK_SLICES names no BD, and for CPU tensors where it names more than
    CPU_WALK_SLICES."""
    slices = 0 if half else WALK_SLICES.get(BD, 0)
    if slices not in (0, 1, 2) or BD % max(slices, 1):
        raise ValueError(f"WALK_SLICES must map BD = {BD} to 1 or 2 slices, got {slices}")
    return 0 if device.type == "cpu" and slices > CPU_WALK_SLICES else slices


def final_state_grads(dht, dst, N: int, H: int, D: int, device):
    """The gradients of the final memory and momentum as the backward walks take them: float32
    and contiguous, or both None; with one of the final states unused, zeros for its
    gradient."""
    if (dht is None) != (dst is None):
        zeros = torch.zeros(N, H, D, D, dtype=torch.float32, device=device)
        dht, dst = (zeros if dht is None else dht), (zeros if dst is None else dst)
    return tuple(None if x is None else x.contiguous().float() for x in (dht, dst))


def chunk_backward(q, k, v, w, b, theta, alpha, eta, hs, ss, initial, do, dht, dst, scale, eps,
                   chunk_size, cu_seqlens, meta, omixed="", walk_mixed=None, hr=None, sr=None,
                   zs=None):
    """(dq, dk, dv, dw, db, dtheta, dalpha, deta, d initial M or None, d initial S or None),
    from the states each mini-batch started with (hs, ss; float16 rows times hr's, sr's
    inverse scales where given); ``initial``: whether the call had an initial memory or
    momentum; ``meta``: the kernels' constexprs and warps (chunk.walk_meta); ``omixed``: the
    outputs kernel's mode (chunk.OUTPUT_MIXED, as the forward ran) for LOCAL_AS_OUTPUTS;
    ``walk_mixed``: the walk's MIXED (chunk.backward_walk_mixed; None: ``meta``'s);
    ``zs``: each mini-batch's Z = K M0 as the forward's walk formed it, or None."""
    B, T, H, D = q.shape
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, chunk_size)
    chunks = NT * (B if cu_seqlens is None else 1)
    f32 = {"dtype": torch.float32, "device": q.device}
    dht, dst = final_state_grads(dht, dst, N, H, D, q.device)
    dq, dk, dv, dtheta, dalpha, deta = (torch.empty_like(x)
                                        for x in (q, k, v, theta, alpha, eta))
    du, dgu, dka = (torch.empty(B, T, H, D, **f32) for _ in range(3))
    z = zs if zs is not None else torch.empty(B, T, H, D, **f32)
    gr = torch.empty(B, T, H, NG.value, **f32)
    dP = torch.empty(chunks, H, chunk_size, chunk_size, **f32)
    half = mode_for(HALF_GRADS, q.dtype)
    if half not in ("", "float16"):
        raise ValueError(f"HALF_GRADS must name 'float16' or None per dtype, got {half!r} for "
                         f"{q.dtype}")
    slices = walk_slices(meta["BD"], q.device, bool(half))
    dms, dss = (torch.empty(chunks, H, D, D, dtype=getattr(torch, half or "float32"),
                            device=q.device) for _ in range(2))
    dmr, dsr = (torch.empty(chunks, H, D, **f32) if half else None for _ in range(2))
    dw1, db1 = torch.empty(chunks, H, D, **f32), torch.empty(chunks, H, D, **f32)
    dw2, db2 = torch.empty(N, H, D, **f32), torch.empty(N, H, D, **f32)
    dh0, ds0 = ((torch.empty(N, H, D, D, **f32), torch.empty(N, H, D, D, **f32)) if initial
                else (None, None))
    do = do.contiguous().to(v.dtype)
    if NT:
        chunk_titans_linear_bwd_local_kernel[(NT, B * H)](
            q, k, v, w, b, theta, alpha, eta, do, hs, ss, hr, sr, dq, z, du, dgu, dka, dP, gr,
            dw1, db1, cu_seqlens, chunk_indices, scale, float(eps), T, Z_STORED=zs is not None,
            MOMENTS=slices > 0,
            OMIXED=omixed if LOCAL_AS_OUTPUTS and chunk_size * meta["BD"] <= RELOAD_TILE else "",
            **local_meta(meta))
    walk_meta = with_warps(meta if walk_mixed is None else {**meta, "MIXED": walk_mixed},
                           WALK_WARPS)
    if slices:
        flags = torch.zeros(N * H * slices + 1, dtype=torch.int32, device=q.device)
        chunk_titans_linear_bwd_walk_cols_kernel[(N * H * slices,)](
            q, k, v, w, b, z, du, dgu, dka, dv, gr, dms, dss, dht, dst, dh0, ds0, dw2, db2,
            flags[-1:], flags, torch.empty(N * H * 2 * slices * 7 * chunk_size, **f32),
            cu_seqlens, chunk_offsets, scale, T, BV=meta["BD"] // slices,
            PAIRED=slices == 2, PREFETCH=COLS_PREFETCH, ACCUMULATE=WALK_ACCUMULATE, **walk_meta)
    else:
        chunk_titans_linear_bwd_walk_kernel[(N * H,)](
            q, k, v, w, b, z, du, dgu, dka, dv, gr, dms, dss, dmr, dsr, dht, dst, dh0, ds0, dw2,
            db2, cu_seqlens, chunk_offsets, scale, float(eps), T, PREFETCH=PREFETCH,
            ACCUMULATE=WALK_ACCUMULATE, **walk_meta)
    if NT:
        meta = {**{key: x for key, x in meta.items() if key not in ("MIXED", "UMIXED")},
                "PRECISION": "ieee", "num_warps": gates_warps(q.dtype, meta["BD"]),
                "DK_PRECISION": dk_precision(q.dtype),
                "ROWS": chunk_size * meta["BD"] ** 2 > GATES_WHOLE}
        meta["BJ"] = GATES_ROWS if meta["ROWS"] else meta["BD"]
        if GATES_MAXNREG is not None:
            meta["maxnreg"] = GATES_MAXNREG
        chunk_titans_linear_bwd_gates_kernel[(NT, B * H)](
            w, b, theta, alpha, eta, hs, ss, hr, sr, dms, dss, dmr, dsr, du, dgu, dka, dP, gr, dk,
            dtheta, dalpha, deta, cu_seqlens, chunk_indices, T, **meta)
    return (dq, dk, dv, (dw1.sum(0) + dw2.sum(0)).to(w.dtype),
            (db1.sum(0) + db2.sum(0)).to(b.dtype), dtheta, dalpha, deta, dh0, ds0)
