"""Titans with a linear memory, chunked form (docs/operators.md section 4): the forward.

A mini-batch of C = chunk_size tokens has rows Q, K, V [C, D], inner learning rates theta [C],
forgetting rates alpha [C] and momentum factors eta [C]. From the memory M0 and momentum S0 it
starts with (references/titans.py unrolls the two recurrences into this):

    Z = K M0,   G = 2 ln_recon_grad(Z, V - K)          (kernels.common.layernorm: every grad_j
                                                         is k_j^T G_j, all taken at M0)
    F[i, j] = prod_{j < r <= i} (1 - alpha_r),   f0[i] = prod_{r <= i} (1 - alpha_r)
    E[i, j] = prod_{j < r <= i} eta_r,           e0[i] = prod_{r <= i} eta_r     (0 for j > i)
    P = F E,   p0 = F e0
    U = f0 * (Q~ M0) + p0 * (Q~ S0) - ((P * theta^T) o (Q~ K^T)) G,   Q~ = scale Q
    O = U + w * LN(U) + b
    M <- f0[n] M0 + p0[n] S0 - K^T ((P[n] * theta) o G),   S <- e0[n] S0 - K^T ((E[n] * theta) o G)

with o the elementwise product, rows scaled by the vectors beside them, and n the mini-batch's
last real token: a last mini-batch shorter than C holds only its real tokens (the rows past
the sequence have G = 0, factors 1 and theta 0, and the carried state is row n's).

The segment products are taken in log space, differences of cumulative sums of the factors'
logs (float64 sums, so that a difference is as exact as the float32 it is rounded to), with
the zero factors counted apart: a product over a segment that holds alpha = 1 or eta = 0 is an
exact 0, and one that underflows is 0, never 0/0.

Two kernels, as chunk_ttt_linear's forward: one program per (sequence, head) walks the
mini-batches with M and S in float32 on chip (Z, G and the two updates; kernels/titans/walk.py),
storing the M0, S0 each mini-batch starts from (float32 for a backward; without one, for
bfloat16 inputs, float16 with rows scaled by powers of two: HALF_STATES); then one program per
(mini-batch, head) forms its outputs from them, all in parallel (kernels/titans/outputs.py).
In a call without a backward at D <= 64 the walk stores G, Q~ M0 and Q~ S0 instead, and the
outputs kernel takes them (WALK_PRODUCTS); or, under REPLAY (for bfloat16 at chunk_size 16),
each mini-batch's G and the states only every REPLAY mini-batches, and one program per
(segment of REPLAY mini-batches, head) forms the segment's outputs from that state and the
stored G, the updates unrolled over the segment (or carried in a chain: REPLAY_CHAIN), all
segments in parallel (or, under REPLAY_OVERLAP, in the walk's launch, each segment once the
walk has passed it: kernels/titans/overlap.py). With WALK_GATES_AHEAD (the default) a third
kernel forms the walk's gate factors first, in parallel (for the replay the outputs' too).
Products of float32 inputs are exact ("ieee"); for half precision they take float32 operands
in three TF32 passes (utils.dot_precision), but the products of input rows with a float32
state: in the walks as WALK_MIXED and UPDATE_MIXED say (for bfloat16 Z = K M0 with M0 as two
bfloat16 halves, the updates one TF32 product), in the outputs kernel as OUTPUT_MIXED says
(for bfloat16 the state as two bfloat16 halves).
WALK_PREFETCH loads the next mini-batch's rows ahead of their turn.

The backward is kernels/titans/chunk_bwd.py (split in three kernels, SPLIT_BACKWARD, the
default), or kernels/titans/fused_bwd.py (one walk, less memory).
"""

from __future__ import annotations

from functools import partial

import torch

from kernels.common.minibatch import head_tile, mini_batch_meta, with_warps
from kernels.common.utils import check_launchable, chunk_layout, mixed_mode, mode_for, processors
from kernels.titans.chunk_bwd import chunk_backward
from kernels.titans.fused_bwd import fused_backward
from kernels.titans.outputs import (chunk_titans_linear_fwd_o_kernel,
                                    chunk_titans_linear_fwd_replay_kernel,
                                    chunk_titans_linear_fwd_segment_kernel)
from kernels.titans.overlap import chunk_titans_linear_fwd_overlap_kernel
from kernels.titans.stages import local_meta
from kernels.titans.walk import (chunk_titans_linear_fwd_gates_kernel,
                                 chunk_titans_linear_fwd_walk_kernel)
from references.operators import TITANS

__all__ = ["chunk_titans_linear"]

MAX_D = 128  # M and S [D, D] float32 on chip in the walk
CHUNK_SIZES = (16, 32, 64)  # tl.dot needs 16 rows at least
# The one-walk backward takes a mini-batch's [C, D] tiles (D padded to a power of two) up to
# 64 * 64 = 4096 values. With 32-token mini-batches at D = 128 ptxas put it at 262,144 bytes of
# shared memory before it loaded M0, S0, Q~ and K again for its last products
# (fused_bwd.RELOAD_TILE), 196,608 after (bfloat16, 1 stage; sm_90 allows 232,448; python
# tools/kernel_registers.py titans --impl chunk --case cs32-d128). 64-token ones at D = 128 do not
# fit it (327,680 bytes in bfloat16); the split backward takes them (chunk_bwd.RELOAD_TILE,
# GATES_WHOLE: --case cs64-d128).
MAX_TILE = 64 * 64
# The backward's split form and the forward walk's prefetch are the defaults: on an H100 in
# bfloat16 (B=2, H=16, D=64, 2026-12-05, reports/titans.md) the split backward took fwd+bwd
# from 6.13 / 24.03 / 95.94 ms to 3.40 / 13.33 / 53.62 at T = 2K / 8K / 32K, the prefetch
# took the forward from 0.764 / 2.922 / 11.607 to 0.683 / 2.655 / 10.349, and every tiling
# class and random case gave the one-walk backward's errors in all three dtypes. The split
# backward stores dM', dS' per mini-batch: 5806 MB of extra peak at 32K against 2566. (With
# WALK_MIXED "round" too, an H200 met an illegal memory access in bfloat16 on 2026-12-04; on
# the H100 no form of these switches faulted, compute-sanitizer included.) Per kernel: `python
# tools/kernel_profile.py titans chunk --seq-len 8192 --head-dim 64 --mode fwdbwd`.
#
# How the walks take their products of input rows and a float32 state for half-precision
# inputs (Z = K M0 wherever it is formed, and the split backward walk's K dM', K dS'; in a
# call with a backward as TRAINING_WALK_MIXED and BACKWARD_WALK_MIXED below say; the updates
# as UPDATE_MIXED says): a minibatch.dot_state mode ("tf32": one TF32 product, the
# state kept to 11 bits; "tf32x2": two, ~22 bits; "split": the state as two halves in the
# inputs' dtype, two products, ~16 bits; "split_trunc": so, for bfloat16 the high half the
# state's upper 16 bits, ~15 bits; "split3": three parts in the inputs' dtype, three
# products, for bfloat16 all 24 bits; "round": the state rounded to the inputs' dtype, one
# product), None (both operands float32, three TF32 passes), or a dict from the inputs' dtype
# name ("float16", "bfloat16") to one of those.
# Z is the product the gates' saturation tests: there M0 is nearly one token's update and
# LayerNorm rescales rows of Z that nearly cancel, so Z's rounding reaches dK. On the gpu
# suite's gate-saturated case (T = 2048, D = 64, gate 20, bfloat16; H100, 2026-12-06, `harness
# check titans --case`) Z in one TF32 product put dK at 18x its tolerance (25x with the updates
# in one too), 24% in "tf32x2"; the updates in one TF32 product left every gradient where
# "tf32x2" had it (dK 25%, the rest <= 25%), the final states at 12% (0%); with Z in "split"
# too dK is at 43%, the rest at 25% or less, the final states 13%. On long-T4096 (gate 20,
# T = 4096) Z in "tf32" failed dK (4.9x) and the final states (2.9x); "split" stays at 22%.
# Every product "tf32x2", the updates "tf32", then Z "split" too: fwd+bwd at T = 8K 7.577,
# 6.862, 6.581 ms at D = 64, 31.899, 28.626, 26.763 at D = 128 (H100, 2026-12-06,
# kernel_profile as above; reports/titans.md). float16 keeps None ("round" put its final
# memory at 1.05e-3 through the interpreter, over float16's tolerance of 4.9e-4). bfloat16's
# modes given to float16 too, with DK_PRECISION "tf32" (H100, D = 64, T = 8K, 2026-12-07):
# fwd / fwd+bwd 1.497 / 6.170 ms with "split" here and in OUTPUT_MIXED, 1.549 / 6.751 with
# "tf32x2", against 2.186 / 10.786 (TTT 0.752 / 4.041), but the float16 tiling family's final
# states failed (133% and 147% of their tolerance under "split", 110% under "tf32x2": the
# updates' one TF32 pass), and under "split" dV, dW, db and the initial states' gradients of
# gate-saturated were inf (the backward's float16 halves).
# "split_trunc" with OUTPUT_MIXED the same and WALK_ACCUMULATE (today's) against "split"
# without them, fwd / fwd+bwd ms, each form twice in one run (H100, T = 8K, 2026-12-06; python
# tools/switch_compare.py titans chunk --no-registered --seq-len 8192 --head-dim D --set ...):
# D = 64 1.454, 1.432 / 6.051, 6.028 against 1.462, 1.407 / 6.249, 6.103; D = 128 3.883, 3.804
# / 23.344, 23.252 against 4.584, 4.481 / 24.769, 24.822. Errors: gate-saturated dK 43% -> 53%
# of its tolerance, the rest within 1%; long-T4096 dK 21% -> 26%, the final states 7% -> 12%;
# the tiling family (bfloat16, float16) passed, worst 24.9%, the final states 15%.
WALK_MIXED = {"bfloat16": "split_trunc"}
# The forward walk's Z in a call with a backward (TRAINING_WALK_MIXED; the outputs kernel and the
# backward's first kernel take it where they form Z again) and the split backward walk's
# K dM', K dS' (BACKWARD_WALK_MIXED) for half-precision inputs: None for WALK_MIXED's mode
# (TRAINING_WALK_MIXED's for the second), else a dot_state mode or a dict per dtype as WALK_MIXED.
# For bfloat16 the first "split3" (the state as three bfloat16 parts, three products: all of
# float32's 24 bits), the second "split_trunc" (~15), as WALK_MIXED for a forward without a
# backward. On an H100 (2026-12-07, reports/titans.md, `harness check titans --dtype bfloat16
# --family long` with --plugin forms) every walk in "split_trunc" failed the long family (gate 20,
# D = 64, T = 1K to 64K): dalpha and deta 109% of their tolerance at T = 4096, dalpha 321% and dK
# 174% at 65536; "split" 74% and 238% there; every walk "tf32x2" (~22 bits) passed, worst 47%, as
# did float32 operands (WALK_MIXED None, worst 25%); Z "tf32x2" or "split3" with the backward
# walk's products "split_trunc" passed, worst 48% (dK at 64K), as did the bfloat16 tiling family
# (worst 25% under "split3"). o and the final states stayed within 20% under every mode. A float64
# emulation of the modes on the long family's inputs (python tools/walk_rounding.py --seq-len T
# --forward F --backward B) puts the failure in the forward walk's Z alone: the backward walk's
# products alone in "split_trunc" worst 27% of a tolerance at T = 4096 (d initial memory); with Z
# "split3" 27% / 30% at 4096 / 65536 (d initial memory, dK); the backward walk's products "tf32"
# with Z "tf32x2" 440% / 1086% (dtheta, dK). fwd+bwd ms at T = 2K / 8K / 32K, H100, bfloat16, one
# run each (python -m harness bench titans ttt --impl chunk --set ... --mode fwdbwd): Z "split3"
# 1.535 / 5.769 / 22.777 at D = 64 and 5.040 / 19.786 / 77.372 at D = 128, "tf32x2" 1.512 /
# 5.754 / 22.731 and 5.296 / 20.984 / 83.595 (ptxas spills 548 bytes a thread in the D = 128 walk
# under "tf32x2", 104 under "split3"); every walk "tf32x2" 1.627 / 6.269 / 24.236 and 5.862 /
# 23.033 / 91.785 in another run, where Z "tf32x2" took 1.530 / 5.763 / 22.762 and 5.376 / 20.964
# / 83.362; every walk "split_trunc" 1.487 / 5.678 / 22.431 and 4.870 / 19.161 / 76.369 in a
# third.
TRAINING_WALK_MIXED = {"bfloat16": "split3"}
BACKWARD_WALK_MIXED = {"bfloat16": "split_trunc"}
# The walks' update products (the forward's K^T (cM o G), K^T (cS o G); the backward's
# Q~^T (f0 o dU), K^T dZ, Q~^T (p0 o dU)) for half-precision inputs: None for WALK_MIXED's
# mode, else a dot_state mode or a dict per dtype as WALK_MIXED (measurements above). The
# one-walk backward (SPLIT_BACKWARD False) takes its products but Z at PRECISION.
UPDATE_MIXED = {"bfloat16": "tf32"}
# Mini-batches whose [C, D] tile holds more than this many values (64 tokens at D = 128) take
# "tf32x2" where WALK_MIXED or UPDATE_MIXED says "tf32": under WALK_MIXED's "tf32" the
# backward's first kernel needed 262,144 bytes of shared memory there, 196,608 under None
# (sm_90 allows 232,448; bfloat16; python tools/kernel_registers.py titans --case cs64-d128
# --kernel bwd_local, with --set for the mode), and an H100 refused to launch it; "tf32x2"
# passed the tiling check there.
TF32_TILE = 32 * 128
# The forward walk's loads: the next mini-batch's rows loaded before this one's products
# (True), or each mini-batch's when it starts (False), as TTT's WALK_PREFETCH (the split
# backward's walk: chunk_bwd.PREFETCH).
WALK_PREFETCH = True
# The forward walk's warps: None for mini_batch_meta's (4 at D <= 64, else 8), or a number
# (chunk_bwd.WALK_WARPS for the backward's walk: 8; this walk at 8 warps measured slower there).
WALK_WARPS = None
# The forward walk's states handed on with each update product accumulated into the rest of its
# sum (tl.dot's acc: f0[n] M0 + p0[n] S0 that of K^T (-cM o G), e0[n] S0 that of K^T (-cS o G);
# True), or formed apart and added (False). bfloat16, D = 64: the loop issues 1,037 instructions
# a mini-batch against 1,103 (the products stored), 851 against 921 (the states), with 230 and
# 206 registers against 250 and 244 (tools/kernel_registers.py titans --case basic --kernel
# fwd_walk --ptx DIR --set "acc:kernels.titans.chunk.WALK_ACCUMULATE=True", tools/sass_loop.py
# DIR/*.ptx). Timed with WALK_MIXED's "split_trunc" (above). Alone, one H100 run (kernel_profile
# as above): the forward at T = 8K 4,607 -> 4,302 µs at D = 128, 1,467 -> 1,572 at D = 64.
WALK_ACCUMULATE = True
# How the outputs kernel takes Q~ M0, Q~ S0 and Q~ K^T for half-precision inputs: None (float32
# operands, three TF32 passes each), or Q's rows in their own dtype with the scale applied
# after, Q K^T one product of input rows and Q M0, Q S0 as a utils.dot_mixed mode; a dict per
# dtype as WALK_MIXED. At T = 8K (H100, bfloat16, B=2, H=16, one run, 2026-12-06,
# kernel_profile as above) fwd / fwd+bwd went from 2.001 / 6.571 ms under "tf32x2" to 1.875 /
# 6.446 under "split" (the state as two bfloat16 halves) at D = 64, from 5.412 / 26.715 to
# 5.170 / 25.384 at D = 128 (the backward's first kernel takes the same products:
# chunk_bwd.LOCAL_AS_OUTPUTS); o's error did not move on gate-saturated, long-T4096 or the
# bfloat16 tiling family (19% of its tolerance). "split_trunc": WALK_MIXED's measurements.
OUTPUT_MIXED = {"bfloat16": "split_trunc"}
# What the forward walk's updates take from the gates (P[n] theta, E[n] theta, f0[n], e0[n],
# p0[n]: segment products, float64 logs and exps): formed by a parallel kernel first and
# loaded by the walk (True), or formed in the walk (False), beside its chain of products
# either way. The same values bit for bit; with it the forward at T = 8K went from 2.455 to
# 1.884 ms (under the walks' "tf32" and OUTPUT_MIXED "tf32x2"; H100, as above).
WALK_GATES_AHEAD = True
# The backward: split in three kernels with only the dM', dS' chain in the walk
# (kernels/titans/chunk_bwd.py, True), or one walk holding every product
# (kernels/titans/fused_bwd.py, False).
SPLIT_BACKWARD = True
# The dtype of the M0, S0 stored per mini-batch in a call without a backward (under torch.no_grad,
# or no input that needs a gradient) where the walk stores states there (D > PRODUCTS_MAX_D, or
# WALK_PRODUCTS None), per inputs' dtype as WALK_MIXED: "float16" (each state's rows scaled by
# powers of two into float16's range, the scales stored beside them:
# minibatch.store_square_scaled), "bfloat16", or None (float32). A store rounds the walk's float32
# states, which carry on in float32 to the final states; half the bytes the walk writes and the
# outputs kernel reads, as chunk_ttt_linear's HALF_STATES. The outputs kernel takes its products
# with them (Z = K M0, Q M0, Q S0) exactly (output_modes). On an H100 (bfloat16, B=2, H=16,
# T=8192, 2026-12-06, reports/titans.md; python tools/kernel_profile.py titans chunk --seq-len
# 8192 --head-dim D --mode fwd --set ...) float16 states took the forward from 1,865 to 1,658 µs
# at D = 64 (walk 1,364 -> 1,235, outputs 452 -> 373) and from 5,187 to 4,739 at D = 128; bfloat16
# states to 1,419 and 4,421. One scale per state instead of per row: the walk 1,350 (a maximum
# across warps), the forward 1,736. The rows' scales put on Q's and K's columns instead of the
# state, the state as two bfloat16 halves: outputs 529 µs. Why float16: where the gates saturate
# (the gpu suite's gate-saturated case) o is 0.0058 off float64 from float16 states (0.0017 from
# float32 ones; tolerance 0.0089, the gpu gate); a float64 emulation of the rounding (python
# tools/rounded_states.py) puts it at 0.0038 from float16 states and 0.0200 from bfloat16 ones, on
# long-T4096 0.0020 and 0.0111. Every other gpu-gate entry of o moved by 1% at most; the bfloat16
# tiling family's o stays at 19% of its tolerance. float16 inputs keep float32 states: HALF_STATES
# "float16" for them is checked through the interpreter only (tests/test_kernels_titans.py), not
# on a GPU, and not timed. (With the backward from bfloat16 states too the gradients' errors grew
# 1.7x median, up to 6.7x, past the tolerances of dalpha, deta and the initial memory's in the
# tiling family.)
HALF_STATES = {"bfloat16": "float16"}
# The states stored per mini-batch for the split backward (SPLIT_BACKWARD): float32 (None), or
# "float16" (per dtype as WALK_MIXED), rows scaled by powers of two as HALF_STATES stores
# them; the walk then stores each mini-batch's Z = K M0 (float32 rows) too, from which the
# outputs kernel and the backward's first kernel form G instead of from the rounded M0, and
# which the backward's walk takes as it is. Through the interpreter (float32 inputs, B=1,
# T=256, H=2, D=32, the gpu suite's draw at gate 20 and at gate 1, the stored states rounded
# to float16 between forward and backward), with Z formed again from the rounded M0 the
# gradients came up to 6.9e-3 off float64 (dK; 1.2e-3 at gate 1; float32 states <= 1.3e-5),
# with Z as the walk formed it <= 5.4e-5 at gate 20 and <= 1.2e-4 at gate 1 (bfloat16 on a
# GPU: 2e-3 to 7e-3 at gate 20); tests/test_kernels_titans_states.py checks the switch in float16.
# Halves what the walk writes and three kernels read of the states (at D = 64, T = 8K, B=2, H=16:
# 268 MB each way instead of 537, Z's 67 MB written and read once more). ptxas (sm_90, bfloat16,
# chunk_size 16; python tools/kernel_registers.py titans --case basic | partial-200 --impl chunk
# --set "hsb:kernels.titans.chunk.HALF_STATES_BACKWARD={'bfloat16': 'float16'}"): the backward's
# first kernel spills 8 bytes a thread at D = 64 (108 with float32 states; shared memory 16 KB
# against 32) and 344 at D = 128 (1,508), its last 588 at D = 128 (816). On an H100 (bfloat16,
# B=2, H=16, chunk_size 16, 2026-12-07, reports/titans.md; `harness bench titans ttt --impl chunk
# --set "hsb:...HALF_STATES_BACKWARD={'bfloat16':'float16'}" --mode fwdbwd ...`) fwd+bwd at T = 2K
# / 8K / 32K took 1.487 / 5.678 / 22.431 ms at D = 64 against 1.614 / 6.068 / 23.808 with float32
# states (TTT 1.066 / 4.014 / 15.701), and 4.870 / 19.161 / 76.369 at D = 128 against 5.930 /
# 23.439 / 92.971 (TTT 2.878 / 11.200 / 44.904); extra peak memory at 8K 1,204 MB against 1,452
# (D = 64), 3,916 against 4,924 (D = 128). Errors: gate-saturated's within 2% of the float32 states'
# (dK 6.70e-3 against 6.69e-3), the bfloat16 tiling family passed (worst 25% of a tolerance), the
# long family as with float32 states.
HALF_STATES_BACKWARD = {"bfloat16": "float16"}
# What the forward walk stores for the outputs kernel: the states M0, S0 each mini-batch starts
# from, from which that kernel forms Z = K M0, G, Q~ M0 and Q~ S0 (None), or G, Q~ M0 and
# Q~ S0 themselves (Q~ M0 and Q~ S0 as OUTPUT_MIXED says), [C, D] float32 rows per mini-batch
# instead of two [D, D] states, so that the outputs kernel takes no state: in calls without a
# backward ("inference"), or in every call ("always": the walk stores the states for the
# backward too), at D <= PRODUCTS_MAX_D. On an H100 (bfloat16, B=2, H=16, T=8192, 2026-12-06,
# reports/titans.md; python tools/kernel_profile.py titans chunk --seq-len 8192 --head-dim D
# --mode fwd --set "states:kernels.titans.chunk.WALK_PRODUCTS=None") the forward at D = 64 went
# from 1,625 to 1,472 µs (walk 1,217 -> 1,275, outputs 359 -> 147), fwd+bwd under "always"
# from 6,304 to 6,339; at D = 128 from 4,594 to 5,470 (walk 3,334 -> 5,142: ptxas spills 764
# bytes a thread in it, 128 without), 5,662 with Q~ M0 and Q~ S0 in one TF32 product each,
# 6,737 at 16 warps. o's error fell where float16 states had raised it: gate-saturated 65% of
# its tolerance -> 19%, long-T4096 24% -> 19%, the tiling family <= 19% in both dtypes.
WALK_PRODUCTS = "inference"
PRODUCTS_MAX_D = 64
# Calls without a backward, at D <= REPLAY_MAX_D and chunk_size <= REPLAY_MAX_CHUNK: the walk
# stores each mini-batch's G and, every REPLAY mini-batches, the M0, S0 that mini-batch starts
# from (float32); then one program per (segment of REPLAY mini-batches, head) forms its
# outputs from that state and the stored G (kernels/titans/outputs.py; REPLAY_CHAIN below
# says how). A number, or a dict per dtype as WALK_MIXED; None: WALK_PRODUCTS and HALF_STATES
# say what the walk stores. On an H100 (bfloat16, B=2, H=16, D=64, chunk_size 16, 2026-12-07,
# reports/titans.md; python tools/switch_compare.py titans chunk --no-registered --mode fwd
# --dtype '' --head-dim 64 --set "off:...REPLAY=None" --set "seg:...REPLAY=8" ..., each form
# twice) the forward took 0.353 / 1.341 / 5.245 ms at T = 2K / 8K / 32K with REPLAY 8
# against 0.376 / 1.449 / 5.709 without (walk 1,266 -> 948 µs, the segment kernel 325 where
# the outputs kernel took 146, gates 50 -> 78); peak memory 180 MB against 228 at 8K; float16
# 0.563 / 8.465 ms at 2K / 32K against 0.667 / 10.236; D = 128 (REPLAY_ROWS 32) 0.723 / 2.816
# / 11.082 against 0.990 / 3.812 / 15.131. The tiling family passed in bfloat16 and float16
# with each; o's error did not move. float32 inputs stay off it (ptxas spills ~10 KB a thread
# in the replay's exact products). REPLAY_MAX_CHUNK keeps chunk_size 32 and 64 on the walk's
# products (segments of at most 4 and 2 mini-batches), untimed.
REPLAY = {"bfloat16": 8, "float16": 8}
REPLAY_MAX_D = 128
REPLAY_MAX_CHUNK = 16
# The walk that stores for the replay carries each state as a scale times a tile
# (stages.hand_on_scaled: f0[n] and e0[n] go into the scales, not into every element): its
# loop issues 811 instructions a mini-batch against 767 (tools/sass_loop.py's count, the rare
# branches that put a scale into its tile included), the forward 1.487 ms against 1.547
# without (H100, 2026-12-06, with the chain).
WALK_SCALES = True
# The replay's outputs: one program per segment carrying the states over its mini-batches in
# a chain (True, the replay kernel), or all the segment's rows at once from its stored states
# and the updates unrolled over it (False, the segment kernel; segments of at most
# 128 // chunk_size mini-batches).
REPLAY_CHAIN = False
# The segment kernel's rows a program: None for all of a segment's (REPLAY * chunk_size), or a
# power of two from chunk_size up: each of a segment's programs then takes the updates of the
# mini-batches up to its own rows' only, so the rows of a segment's first mini-batches take
# fewer products (chunk_size 16, segments of 8: at 16 rows a program, 36 [16, 16] x [16, D]
# products with a G a segment against 64 at 128). A number, or a dict from head tiles
# (head_tile(D)) to numbers, None where the dict names no tile. H100, bfloat16, chunk_size
# 16, B=2, H=16, forward, 2026-12-07 (tools/switch_compare.py as for REPLAY): at D = 64 all
# rows 1.353 / 5.302 ms at 8K / 32K, 16 rows 1.556 / 6.183, 32 rows 1.645 / 6.602; at D = 128
# and 8K, 16 rows 3.137 ms, 32 rows 2.855 (2.816 in a second run, 64 rows 2.867 there); all
# rows untimed (ptxas: 255 registers and 60 bytes of spills a thread).
REPLAY_ROWS = {128: 32}
# The replay's and the segment kernel's warps: None for mini_batch_meta's (4 at D <= 64, else
# 8), or a number: at 4 warps and D = 64 ptxas spills 148 bytes a thread in the replay kernel,
# at 8 none (229 registers; the segment kernel 198 at chunk_size 16, 255 at 64).
REPLAY_WARPS = 8
# The segment kernel's products (Q~ K_m^T o W_m) G_m, float32 on both sides: Triton's
# input_precision per dtype as WALK_MIXED ("tf32": one TF32 pass, "tf32x3", "ieee"); None
# for the kernels' PRECISION (utils.dot_precision: three TF32 passes for half-precision
# inputs). "tf32" on the H100 (2026-12-07, D = 64, 8K / 32K): 1.290 / 5.030 ms against
# 1.353 / 5.302, and gate-saturated o 1.84e-3 against 1.66e-3 in bfloat16, 8.0e-4 against
# 2.1e-4 in float16: 5% of the time is not worth 11% and 4x of o's error.
REPLAY_G_PRECISION = None
# The forward walk's chain: each mini-batch's Z = K M0 from M0 after its update (False), or
# with the product that takes the state one mini-batch ahead (walk.ahead_step: Z = m (K N -
# (K K'^T) (cM' o G')), N the handed-on state before the last update), so that the updates
# and the product with the state lie beside the chain from one G to the next; it loads ahead
# and accumulates whatever WALK_PREFETCH and WALK_ACCUMULATE say. Slower and less accurate
# on an H100 (bfloat16, 2026-12-07, reports/titans.md): the forward at D = 64, 8K 1.877 ms
# against 1.339, gate-saturated dK 0.0156 against 0.0067 (the correction's product of float32
# G in three TF32 passes beside the state's truncated split).
WALK_AHEAD = False
# The segment kernel's programs in the walk's launch (kernels/titans/overlap.py), each forming its
# segment's outputs once the walk has passed it (True), or launched after the walk (False); not
# with WALK_AHEAD or REPLAY_CHAIN, and on a GPU only where the N H walks take at most
# OVERLAP_SHARE of its SMs (one program a SM: more would walk in waves; 0.5 untimed).
# OVERLAP_WARPS: the launch's (None: the walk's). H100, bfloat16, B=2, H=16, D=64, T = 2K / 8K /
# 32K (reports/titans.md): 0.318 / 1.103 / 4.322 ms against 0.401 / 1.365 / 5.210 apart, at 8
# warps (208 registers). Off until its tiling classes are checked on a GPU.
REPLAY_OVERLAP = False
OVERLAP_WARPS = 8
OVERLAP_SHARE = 0.5
# The gates kernel's warps (a program holds a mini-batch's [C, C] gate products; 78 µs of the
# forward at D = 64, T = 8K on an H100 with the replay's part). Other counts untimed.
GATES_WARPS = 4


def state_dtype(dtype: torch.dtype, backward: bool) -> torch.dtype:
    """The dtype of the states stored per mini-batch for inputs of ``dtype``, in a call with a
    backward (HALF_STATES_BACKWARD, the split backward only) or without (HALF_STATES)."""
    if dtype == torch.float32 or (backward and not SPLIT_BACKWARD):
        return torch.float32
    name, setting, allowed = (("HALF_STATES_BACKWARD", HALF_STATES_BACKWARD, ("", "float16"))
                              if backward else
                              ("HALF_STATES", HALF_STATES, ("", "float16", "bfloat16")))
    half = mode_for(setting, dtype)
    if half not in allowed:
        raise ValueError(f"{name} must name {' or '.join(repr(a) for a in allowed[1:])} or None "
                         f"per dtype, got {half!r} for {dtype}")
    return getattr(torch, half) if half else torch.float32


def walk_mixed(dtype: torch.dtype, backward: bool = False) -> str:
    """The forward walk's Z mode for inputs of ``dtype``, as the kernels' MIXED ("" for None):
    TRAINING_WALK_MIXED's in a call with a backward where it is set, else WALK_MIXED's."""
    if backward and TRAINING_WALK_MIXED is not None:
        return mixed_mode("TRAINING_WALK_MIXED", TRAINING_WALK_MIXED, dtype)
    return mixed_mode("WALK_MIXED", WALK_MIXED, dtype)


def tile_mode(mode: str, meta: dict) -> str:
    """A product mode for a kernel of ``meta``: "tf32x2" for "tf32" where a mini-batch's tile
    holds more than TF32_TILE values, else ``mode``."""
    return "tf32x2" if mode == "tf32" and meta["BC"] * meta["BD"] > TF32_TILE else mode


def walk_meta(q: torch.Tensor, chunk_size: int, backward: bool = False) -> dict:
    """The constexprs and warps of every Titans kernel of a call with or without a backward,
    walk_mixed as MIXED and the walks' update mode (UPDATE_MIXED) as UMIXED ("tf32x2" for
    "tf32" where a mini-batch's tile holds more than TF32_TILE values); stages.local_meta takes
    UMIXED out for the other kernels."""
    meta = mini_batch_meta(q, chunk_size)
    mixed = walk_mixed(q.dtype, backward)
    umixed = (mixed_mode("UPDATE_MIXED", UPDATE_MIXED, q.dtype) if UPDATE_MIXED is not None
              else mixed)
    return {**meta, "MIXED": tile_mode(mixed, meta), "UMIXED": tile_mode(umixed, meta)}


def backward_walk_mixed(dtype: torch.dtype, meta: dict) -> str:
    """The split backward walk's MIXED for inputs of ``dtype``: BACKWARD_WALK_MIXED's mode
    (tile_mode), or the forward walk's (``meta``, walk_meta's) where it is None."""
    if BACKWARD_WALK_MIXED is None:
        return meta["MIXED"]
    return tile_mode(mixed_mode("BACKWARD_WALK_MIXED", BACKWARD_WALK_MIXED, dtype), meta)


def output_modes(dtype: torch.dtype, states: torch.dtype, meta: dict) -> dict:
    """The outputs kernel's products with the stored states (of dtype ``states``), as its MIXED
    (Z = K M0) and OMIXED (Q~ M0, Q~ S0). Where HALF_STATES stored them in half precision, one
    product that keeps both operands exactly: of input-dtype operands ("round") for bfloat16
    states of bfloat16 inputs, else in TF32 (a float16 value's 11 bits, times a power of two,
    are TF32's; tile_mode). With float32 states OMIXED as OUTPUT_MIXED says and MIXED as the
    walk's (``meta``)."""
    if states == torch.float32:
        return {"OMIXED": mixed_mode("OUTPUT_MIXED", OUTPUT_MIXED, dtype)}
    if states == dtype == torch.bfloat16:
        mode = "round"
    else:
        mode = tile_mode("tf32", meta)
    return {"MIXED": mode, "OMIXED": mode}


def unsupported(D: int, chunk_size: int) -> str | None:
    """Why the kernels cannot take head size D with mini-batches of chunk_size (None: they can)."""
    if D > MAX_D:
        return f"D must be <= {MAX_D}, got D={D}"
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}"
    if not SPLIT_BACKWARD and chunk_size * head_tile(D) > MAX_TILE:
        return (f"chunk_size={chunk_size} takes D <= {MAX_TILE // chunk_size} with the "
                f"one-walk backward (SPLIT_BACKWARD=False: a mini-batch's tiles would not fit "
                f"in shared memory), got D={D}")
    return None


def _forward(q, k, v, w, b, theta, alpha, eta, scale, eps, chunk_size, h0, s0,
             output_final_state, cu_seqlens, backward):
    """(o, final M or None, final S or None, what the backward takes: the M0 and S0 of every
    mini-batch, their rows' inverse scales or None, each mini-batch's Z or None); inputs checked
    and contiguous; ``backward``: whether a backward will take the states (HALF_STATES,
    HALF_STATES_BACKWARD)."""
    B, T, H, D = q.shape
    N, NT, chunk_indices, chunk_offsets = chunk_layout(B, T, cu_seqlens, chunk_size)
    chunks = NT * (B if cu_seqlens is None else 1)
    f32 = {"dtype": torch.float32, "device": q.device}
    ht = torch.empty(N, H, D, D, **f32) if output_final_state else None
    st = torch.empty(N, H, D, D, **f32) if output_final_state else None
    replay = ((mode_for(REPLAY, q.dtype) or 1) if not backward and NT and head_tile(D) <=
              REPLAY_MAX_D and chunk_size <= REPLAY_MAX_CHUNK else 1)
    if replay & (replay - 1):
        raise ValueError(f"REPLAY must be a power of two, got {replay}")
    if not REPLAY_CHAIN:
        replay = min(replay, max(1, 128 // chunk_size))
    rows = (REPLAY_ROWS.get(head_tile(D)) if isinstance(REPLAY_ROWS, dict) else REPLAY_ROWS
            ) if replay > 1 and not REPLAY_CHAIN else None  # the segment kernel's
    if rows is not None and (rows < chunk_size or rows & (rows - 1)):
        raise ValueError(f"REPLAY_ROWS must be a power of two of at least chunk_size "
                         f"({chunk_size}), got {rows}")
    if replay > 1 and not REPLAY_CHAIN:  # None: all of a segment's rows
        rows = min(rows or replay * chunk_size, replay * chunk_size)
    gprecision = mode_for(REPLAY_G_PRECISION, q.dtype) if replay > 1 and not REPLAY_CHAIN else ""
    if gprecision not in ("", "tf32", "tf32x3", "ieee"):
        raise ValueError(f"REPLAY_G_PRECISION must be 'tf32', 'tf32x3', 'ieee' or None per "
                         f"dtype, got {gprecision!r} for {q.dtype}")
    if replay > 1:
        _, NS, segment_indices, segment_offsets = chunk_layout(B, T, cu_seqlens,
                                                               chunk_size * replay)
    # A scaled walk's tiles and updates reach 1 / SCALE_FLOOR (2^40) times the state's size:
    # float16's range cannot hold them rounded to it (o inf through the interpreter).
    halved = {mode_for(m, q.dtype) for m in (WALK_MIXED, UPDATE_MIXED)} & {
        "round", "split", "split_trunc", "split3"}
    scales = WALK_SCALES and replay > 1 and not (q.dtype == torch.float16 and halved)
    forms = ("always",) if backward else ("always", "inference")
    products = WALK_PRODUCTS in forms and head_tile(D) <= PRODUCTS_MAX_D and replay == 1
    sdt = state_dtype(q.dtype, backward) if replay == 1 else torch.float32
    slots = chunks if replay == 1 else NS * (B if cu_seqlens is None else 1)
    hs, ss = (torch.empty(slots, H, D, D, dtype=sdt, device=q.device)
              if backward or not products else None for _ in range(2))
    hr, sr = (torch.empty(chunks, H, D, **f32) if hs is not None and sdt == torch.float16
              else None for _ in range(2))
    qm, qs = (torch.empty(B, T, H, D, **f32) if products else None for _ in range(2))
    gs = torch.empty(B, T, H, D, **f32) if products or replay > 1 else None
    zs = torch.empty(B, T, H, D, **f32) if backward and sdt == torch.float16 else None
    meta = walk_meta(q, chunk_size, backward)
    omixed = {"OMIXED": mixed_mode("OUTPUT_MIXED", OUTPUT_MIXED, q.dtype)}
    ahead = WALK_GATES_AHEAD and NT > 0
    gates = ahead or replay > 1  # replay > 1 only where NT > 0
    gc, gf = (torch.empty(B, T, H, 2, **f32) if gates else None for _ in range(2))
    gn = torch.empty(chunks, H, 4, **f32) if gates else None
    ga = torch.empty(chunks, H, chunk_size, chunk_size, **f32) if replay > 1 else None
    one = (replay > 1 and REPLAY_OVERLAP and not (REPLAY_CHAIN or WALK_AHEAD)
           and N * H <= OVERLAP_SHARE * processors(q.device))  # the walk and replay in one
    flags = torch.empty(1 + N * H, dtype=torch.int32, device=q.device) if one else None
    if gates:  # (one implies gates) with flags it zeroes them too
        chunk_titans_linear_fwd_gates_kernel[(NT, B * H)](
            w, b, theta, alpha, eta, gc, gn, ga, gf, flags, 1 + N * H, cu_seqlens, chunk_indices,
            T, H=H, D=D, BD=meta["BD"], BC=chunk_size, PRECISION=meta["PRECISION"],
            OUTPUTS=replay > 1, num_warps=GATES_WARPS)
    o = torch.empty_like(v)
    if one:
        blocks = NS * replay * chunk_size // rows * B * H
        order = (None if cu_seqlens is None else
                 torch.argsort(segment_indices[:, 1], stable=True).to(torch.int32))
        chunk_titans_linear_fwd_overlap_kernel[(N * H + blocks,)](
            q, k, v, w, b, o, theta, alpha, eta, gc, gn, ga, gf, h0, s0, ht, st, hs, ss, gs,
            flags, cu_seqlens, chunk_offsets, segment_offsets, segment_indices, order, scale,
            float(eps), T, N * H,
            EVERY=replay, ROWS=rows, GPRECISION=gprecision or meta["PRECISION"],
            PREFETCH=WALK_PREFETCH, GATES_AHEAD=ahead, ACCUMULATE=WALK_ACCUMULATE, SCALES=scales,
            **with_warps({**meta, **omixed}, OVERLAP_WARPS or WALK_WARPS))
        return o, ht, st, (hs, ss, hr, sr, zs)
    chunk_titans_linear_fwd_walk_kernel[(N * H,)](
        q, k, v, w, b, theta, alpha, eta, gc, gn, h0, s0, ht, st, hs, ss, hr, sr, qm, qs, gs, zs,
        cu_seqlens, chunk_offsets, segment_offsets if replay > 1 else None, scale, float(eps),
        T, EVERY=replay, PREFETCH=WALK_PREFETCH, GATES_AHEAD=ahead, ACCUMULATE=WALK_ACCUMULATE,
        SCALES=scales, AHEAD=WALK_AHEAD, **with_warps({**meta, **omixed}, WALK_WARPS))
    if replay > 1 and not REPLAY_CHAIN:
        chunk_titans_linear_fwd_segment_kernel[(NS * replay * chunk_size // rows, B * H)](
            q, k, w, b, o, hs, ss, gs, gc, gn, ga, gf, cu_seqlens, chunk_offsets,
            segment_indices, scale, float(eps), T, EVERY=replay, ROWS=rows,
            GPRECISION=gprecision or meta["PRECISION"],
            **with_warps({key: x for key, x in {**meta, **omixed}.items()
                          if key not in ("MIXED", "UMIXED")}, REPLAY_WARPS))
    elif replay > 1:
        chunk_titans_linear_fwd_replay_kernel[(NS, B * H)](
            q, k, w, b, o, hs, ss, gs, gc, gn, ga, gf, cu_seqlens, chunk_offsets,
            segment_indices, scale, float(eps), T, EVERY=replay, ACCUMULATE=WALK_ACCUMULATE,
            **with_warps({key: x for key, x in {**meta, **omixed}.items() if key != "MIXED"},
                         REPLAY_WARPS))
    elif NT:
        modes = omixed if products else output_modes(q.dtype, sdt, meta)
        chunk_titans_linear_fwd_o_kernel[(NT, B * H)](
            q, k, v, w, b, theta, alpha, eta, o, hs, ss, hr, sr, zs, qm, qs, gs, cu_seqlens,
            chunk_indices, scale, float(eps), T, **{**local_meta(meta), **modes})
    return o, ht, st, (hs, ss, hr, sr, zs)


class ChunkTitansFunction(torch.autograd.Function):
    """Forward by _forward keeping the states per mini-batch, backward by
    kernels/titans/chunk_bwd.py."""

    @staticmethod
    def forward(ctx, q, k, v, w, b, theta, alpha, eta, scale, eps, chunk_size, h0, s0,
                output_final_state, cu_seqlens):
        # the switches as the forward runs (the backward recomputes G with its products), read
        # before any launch: a bad one raises before the forward's kernels run
        ctx.meta = walk_meta(q, chunk_size, True)
        ctx.backward = (partial(chunk_backward, omixed=mode_for(OUTPUT_MIXED, q.dtype),
                                walk_mixed=backward_walk_mixed(q.dtype, ctx.meta))
                        if SPLIT_BACKWARD else fused_backward)  # hr, sr, zs: None if fused
        o, ht, st, (hs, ss, hr, sr, zs) = _forward(q, k, v, w, b, theta, alpha, eta, scale, eps,
                                                   chunk_size, h0, s0, output_final_state,
                                                   cu_seqlens, True)
        ctx.save_for_backward(q, k, v, w, b, theta, alpha, eta, hs, ss, h0, s0, cu_seqlens, hr,
                              sr, zs)
        ctx.scale, ctx.eps, ctx.chunk_size = scale, eps, chunk_size
        return o, ht, st

    @staticmethod
    def backward(ctx, do, dht, dst):
        q, k, v, w, b, theta, alpha, eta, hs, ss, h0, s0, cu_seqlens, hr, sr, zs = (
            ctx.saved_tensors)
        stored = {"hr": hr, "sr": sr, "zs": zs} if zs is not None else {}
        dq, dk, dv, dw, db, dtheta, dalpha, deta, dh0, ds0 = ctx.backward(
            q, k, v, w, b, theta, alpha, eta, hs, ss, h0 is not None or s0 is not None, do, dht,
            dst, ctx.scale, ctx.eps, ctx.chunk_size, cu_seqlens, ctx.meta, **stored)
        return (dq, dk, dv, dw, db, dtheta, dalpha, deta, None, None, None,
                None if h0 is None else dh0.to(h0.dtype),
                None if s0 is None else ds0.to(s0.dtype), None, None)


def chunk_titans_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    initial_momentum: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Titans with a linear memory (Triton), forward and backward. q, k, v [B,T,H,D]; w, b
    [H,D]; theta, alpha, eta [B,T,H]; initial_state (M) and initial_momentum (S) [N,H,D,D],
    either or both. Returns o [B,T,H,D] in v's dtype and the final memory and momentum
    [N,H,D,D] in float32 (None, None unless output_final_state). D <= 128, chunk_size 16, 32 or
    64 (with the one-walk backward 64 takes D <= 64; ``unsupported``). Gradients for q, k, v, w,
    b, theta, alpha, eta and both initial states."""
    name = "chunk_titans_linear"
    args = dict(q=q, k=k, v=v, w=w, b=b, theta=theta, alpha=alpha, eta=eta, scale=scale,
                eps=eps, chunk_size=chunk_size, initial_state=initial_state,
                initial_momentum=initial_momentum, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens)
    dims = TITANS.validate(args)
    check_launchable(name, q)
    why = unsupported(dims["D"], chunk_size)
    if why:
        raise ValueError(f"{name}: {why}")
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in args.values())
    q, k, v, w, b, theta, alpha, eta = (x.contiguous() for x in (q, k, v, w, b, theta, alpha,
                                                                  eta))
    h0 = None if initial_state is None else initial_state.contiguous()
    s0 = None if initial_momentum is None else initial_momentum.contiguous()
    scale = TITANS.resolve_scale(scale, dims)
    if grad:
        return ChunkTitansFunction.apply(q, k, v, w, b, theta, alpha, eta, scale, eps,
                                         chunk_size, h0, s0, output_final_state, cu_seqlens)
    o, ht, st, _ = _forward(q, k, v, w, b, theta, alpha, eta, scale, eps, chunk_size, h0,
                               s0, output_final_state, cu_seqlens, False)
    return o, ht, st
