"""Stages shared by the kernels that walk mini-batches with a [D, D] state on chip (TTT-Linear,
Titans; docs/operators.md sections 3 and 4): what a program handles, its head's tiles and
LayerNorm weights, a stored square state's load, and the loads again that keep the widest
tiles within shared memory.

Two kinds of program: a walk, one per (sequence, head), takes the sequence's mini-batches in
order (walk_program); a mini-batch program, one per (mini-batch, head), handles one mini-batch
from the state it starts with (mini_batch_program). Per-mini-batch tensors are numbered by the
mini-batch's index among all (utils.chunk_index) times H plus the head.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.utils import (MIN_TILE, chunk_index, chunk_rows, dot_mixed, dot_precision,
                                  dot_split3, load_rows_as, split_halves, tf32_head,
                                  walk_bounds)

__all__ = ["dot_state", "dot_state_into", "head_tile", "head_tiles", "load_square",
           "load_square_cols", "load_square_cols_scaled", "load_square_rows",
           "load_square_rows_scaled", "load_square_scaled", "mini_batch_meta",
           "mini_batch_program", "step_signal", "step_wait", "reload_rows", "reload_square",
           "sequence_program", "start_slice", "start_square", "store_square_scaled",
           "walk_program"]


def head_tile(D: int) -> int:
    """BD: the tile of a head dimension, D padded to a power of two (MIN_TILE at least)."""
    return max(MIN_TILE, triton.next_power_of_2(D))


def mini_batch_meta(q, chunk_size: int) -> dict:
    """The constexprs and warps the mini-batch kernels launch with, for inputs like q
    [B, T, H, D] and mini-batches of chunk_size: 4 warps at D <= 64, else 8."""
    D = q.shape[-1]
    return {"H": q.shape[2], "D": D, "BD": head_tile(D), "BC": chunk_size,
            "PRECISION": dot_precision(q.dtype), "num_warps": 4 if D <= 64 else 8}


def with_warps(meta: dict, warps: int | None) -> dict:
    """meta with num_warps set to ``warps`` (None: as it is)."""
    return meta if warps is None else {**meta, "num_warps": warps}


@triton.jit
def head_tiles(w, b, i_h, D: tl.constexpr, BD: tl.constexpr):
    """(o_d, m_d, o_s, m_s, w, b) of head i_h: its columns, a [D, D] state's offsets and mask,
    and its LayerNorm weight and bias in float32 (0 past D)."""
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(w + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    b_b = tl.load(b + i_h * D + o_d, mask=m_d, other=0.).to(tl.float32)
    return o_d, m_d, o_d[:, None] * D + o_d[None, :], m_d[:, None] & m_d[None, :], b_w, b_b


@triton.jit
def walk_program(w, b, cu_seqlens, chunk_offsets, T, H: tl.constexpr, D: tl.constexpr,
                 BD: tl.constexpr, BC: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What a (sequence, head) program walks: (i_nh, i_h, bos, L, NT, c0) (its tokens, its
    mini-batches and the first one's index among all), then head_tiles."""
    return sequence_program(tl.program_id(0), w, b, cu_seqlens, chunk_offsets, T, H, D, BD, BC,
                            IS_VARLEN)


@triton.jit
def sequence_program(i_nh, w, b, cu_seqlens, chunk_offsets, T, H: tl.constexpr,
                     D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
                     IS_VARLEN: tl.constexpr):
    """walk_program's values for sequence and head i_nh (a program id from a counter)."""
    i_h = i_nh % H
    bos, eos, NT, c0 = walk_bounds(cu_seqlens, chunk_offsets, i_nh // H, T, BC, IS_VARLEN)
    o_d, m_d, o_s, m_s, b_w, b_b = head_tiles(w, b, i_h, D, BD)
    return i_nh, i_h, bos, eos - bos, NT, c0, o_d, m_d, o_s, m_s, b_w, b_b


@triton.jit
def mini_batch_program(w, b, cu_seqlens, chunk_indices, T, H: tl.constexpr, D: tl.constexpr,
                       BD: tl.constexpr, BC: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What a (mini-batch, head) program handles: (i_s, row0, o_c, m_t, n_t) (its index among
    all mini-batches times H plus its head, its first row, its rows and which hold tokens, how
    many do), then head_tiles."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    i_t, m_t, row0 = chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H, BC, IS_VARLEN)
    i_s = chunk_index(i_c, i_bh, i_t, T, H, BC, IS_VARLEN) * H + i_h
    o_d, m_d, o_s, m_s, b_w, b_b = head_tiles(w, b, i_h, D, BD)
    n_t = tl.sum(m_t.to(tl.int32), 0)
    return i_s, row0, tl.arange(0, BC), m_t, n_t, o_d, m_d, o_s, m_s, b_w, b_b


@triton.jit
def load_square(p, i, o_s, m_s, D: tl.constexpr):
    """State i of a [.., D, D] tensor, in float32 (0 past D)."""
    return load_square_as(p, i, o_s, m_s, D, "", "")


@triton.jit
def store_square_scaled(p, p_r, i, b_x, o_d, m_d, o_s, m_s, D: tl.constexpr):
    """Store float32 state b_x as state i of a float16 [.., D, D] tensor p, each row scaled by
    the power of two that puts its largest magnitude in [2^14, 2^15): float16's range holds
    every row whatever the state's size, and each value keeps float16's 11 bits (values under
    2^-24 of their row's largest fewer). The rows' inverse scales go to p_r [.., D] (float32);
    load_square_scaled undoes the scales exactly."""
    b_m = tl.max(tl.abs(b_x), 1)
    # the row maximum's exponent, within +-60: both scales far from float32's limits
    b_e = ((b_m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    b_e = tl.minimum(tl.maximum(b_e, -60), 60)
    b_s = ((141 - b_e) << 23).to(tl.float32, bitcast=True)  # 2^(14 - e)
    tl.store(p + i.to(tl.int64) * D * D + o_s,
             (b_x * b_s[:, None]).to(p.dtype.element_ty), mask=m_s)
    tl.store(p_r + i.to(tl.int64) * D + o_d, ((113 + b_e) << 23).to(tl.float32, bitcast=True),
             mask=m_d)  # 2^(e - 14)


@triton.jit
def load_square_scaled(p, p_r, i, o_d, m_d, o_s, m_s, D: tl.constexpr):
    """State i as store_square_scaled stored it, in float32: the float16 rows times their
    inverse scales, exactly."""
    b_r = tl.load(p_r + i.to(tl.int64) * D + o_d, mask=m_d, other=0.)
    return load_square(p, i, o_s, m_s, D) * b_r[:, None]


@triton.jit
def load_square_rows(p, i, o_j, o_d, m_d, D: tl.constexpr):
    """Rows o_j of state i of a [.., D, D] tensor, in float32 (0 past D): a block of the state
    for a kernel that takes it a block at a time."""
    return tl.load(p + i.to(tl.int64) * D * D + o_j[:, None] * D + o_d[None, :],
                   mask=(o_j < D)[:, None] & m_d[None, :], other=0.).to(tl.float32)


@triton.jit
def load_square_rows_scaled(p, p_r, i, o_j, o_d, m_d, D: tl.constexpr):
    """Rows o_j of state i as store_square_scaled stored it, in float32 (0 past D)."""
    b_r = tl.load(p_r + i.to(tl.int64) * D + o_j, mask=o_j < D, other=0.)
    return load_square_rows(p, i, o_j, o_d, m_d, D) * b_r[:, None]


@triton.jit
def load_square_cols(p, i, o_d, m_d, o_k, D: tl.constexpr):
    """Columns o_k of state i of a [.., D, D] tensor, in float32 (0 past D): as
    load_square_rows, a block of the state."""
    return tl.load(p + i.to(tl.int64) * D * D + o_d[:, None] * D + o_k[None, :],
                   mask=m_d[:, None] & (o_k < D)[None, :], other=0.).to(tl.float32)


@triton.jit
def load_square_cols_scaled(p, p_r, i, o_d, m_d, o_k, D: tl.constexpr):
    """Columns o_k of state i as store_square_scaled stored it, in float32 (0 past D)."""
    b_r = tl.load(p_r + i.to(tl.int64) * D + o_d, mask=m_d, other=0.)
    return load_square_cols(p, i, o_d, m_d, o_k, D) * b_r[:, None]


@triton.jit
def load_square_as(p, i, o_s, m_s, D: tl.constexpr, EVICT: tl.constexpr, CACHE: tl.constexpr):
    """load_square with tl.load's eviction_policy EVICT and cache_modifier CACHE (as
    utils.load_rows_as)."""
    return tl.load(p + i.to(tl.int64) * D * D + o_s, mask=m_s, other=0., eviction_policy=EVICT,
                   cache_modifier=CACHE).to(tl.float32)


# The compiler keeps one shared-memory copy of a product's operand per loaded value (two under
# three TF32 passes), alive from the value's first product to its last. A kernel whose copies
# together would exceed sm_90's 232,448 bytes at its widest tiles loads a row tile or a state
# again for its last products (reload_rows, reload_square), past a size it names (TTT's and
# Titans' RELOAD_TILE), so that the first copy ends early.


@triton.jit
def reload_square(b_S, b_rows, p, i, o_s, m_s, D: tl.constexpr, LIMIT: tl.constexpr):
    """b_S, state i of p as load_square gave it, for a later product: loaded again when the
    mini-batch's row tile b_rows holds more than LIMIT values (with another eviction hint, so
    that the compiler does not merge the two loads), else b_S itself."""
    b_x = b_S
    if b_rows.shape[0] * b_rows.shape[1] > LIMIT:
        b_x = load_square_as(p, i, o_s, m_s, D, "evict_last", "")
    return b_x


@triton.jit
def reload_rows(b_x, x, o_c, m_t, o_d, scale, D: tl.constexpr, H: tl.constexpr,
                LIMIT: tl.constexpr):
    """b_x, the rows utils.load_rows(x, o_c, m_t, o_d, D, H) gave in float32 times scale, for
    a later product: loaded again when the tile holds more than LIMIT values (as
    reload_square), else b_x itself."""
    b_y = b_x
    if b_x.shape[0] * b_x.shape[1] > LIMIT:
        b_y = load_rows_as(x, o_c, m_t, o_d, D, H, "evict_last", "").to(tl.float32) * scale
    return b_y


@triton.jit
def start_square(p, i, o_s, m_s, D: tl.constexpr, BD: tl.constexpr, GIVEN: tl.constexpr):
    """The [BD, BD] float32 state a walk starts from: state i of p when GIVEN, else 0."""
    return start_slice(p, i, o_s, m_s, D, BD, BD, GIVEN)


@triton.jit
def start_slice(p, i, o_s, m_s, D: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                GIVEN: tl.constexpr):
    """start_square's [BD, BV] slice of columns (o_s, m_s: its offsets and mask in the state)."""
    b_x = tl.zeros([BD, BV], dtype=tl.float32)
    if GIVEN:
        b_x = load_square(p, i, o_s, m_s, D)
    return b_x


@triton.jit
def dot_state(b_x, b_S, HALF: tl.constexpr, PRECISION: tl.constexpr, MIXED: tl.constexpr):
    """b_x @ b_S for rows b_x (float32, exact copies of values in the inputs' dtype HALF) and a
    float32 state b_S (either side may be transposed): at PRECISION when MIXED is "", else as
    utils.dot_mixed of b_x in HALF with MIXED ("tf32", "tf32x2", "split", "split_trunc",
    "split3", "round"): the walks' products of input rows and a state."""
    if MIXED == "":
        return tl.dot(b_x, b_S, input_precision=PRECISION)
    return dot_mixed(b_x.to(HALF), b_S, PRECISION, MIXED)


@triton.jit
def dot_state_into(b_x, b_S, b_acc, HALF: tl.constexpr, PRECISION: tl.constexpr,
                   MIXED: tl.constexpr):
    """b_acc + dot_state(b_x, b_S, HALF, PRECISION, MIXED) with the product accumulated into
    b_acc (tl.dot's acc): no [R, N] float32 result beside it. "tf32x2" as b_S's leading 11 bits
    and the rest (utils.tf32_head), "split" and "split_trunc" as its two halves
    (utils.split_halves), "split3" as its three parts (utils.dot_split3), each product
    accumulated in turn; "round" b_S rounded to HALF."""
    if MIXED == "":
        b_y = tl.dot(b_x, b_S, b_acc, input_precision=PRECISION)
    elif MIXED == "tf32":
        b_y = tl.dot(b_x.to(HALF).to(tl.float32), b_S, b_acc, input_precision="tf32")
    elif MIXED == "tf32x2":
        b_h = b_x.to(HALF).to(tl.float32)
        b_hi = tf32_head(b_S)
        b_y = tl.dot(b_h, b_S - b_hi, tl.dot(b_h, b_hi, b_acc, input_precision="tf32"),
                     input_precision="tf32")
    elif MIXED == "round":
        b_y = tl.dot(b_x.to(HALF), b_S.to(HALF), b_acc)
    elif MIXED == "split3":
        b_y = dot_split3(b_x.to(HALF), b_S, b_acc)
    else:
        b_h = b_x.to(HALF)
        b_hi, b_lo = split_halves(b_S, HALF, MIXED == "split_trunc")
        b_y = tl.dot(b_h, b_lo, tl.dot(b_h, b_hi, b_acc))
    return b_y


# Programs of one launch that hand each other values while they run (a walk by column slices,
# each program one slice; a walk and the programs that take its stores segment by segment):
# one publishes its values, then step_signal's flag; another's step_wait returns once that flag
# has passed the step. The one that waits must not hold back the one it waits on: the launch
# takes program ids from a counter (tl.atomic_add on a zeroed int32), so that the program
# waited on is running or the next to start: a walk's flags are waited on by programs with
# later tickets only; of a pair (consecutive tickets) the first waits on the next to start.
# Triton's interpreter runs a launch's programs one after another in ticket order: there a
# pair's first would wait forever, a program that waits on earlier ones finds their flags set.


@triton.jit
def step_signal(p_flag, step):
    """Tell the programs that wait on p_flag that this one's values for ``step`` are stored:
    after every thread's stores (a barrier), the flag set to step + 1 with release ordering."""
    tl.debug_barrier()
    tl.atomic_xchg(p_flag, step + 1, sem="release")


@triton.jit
def step_wait(p_flag, step):
    """Wait until the flag p_flag says another program's values for ``step`` are stored
    (acquire ordering, which makes them visible to the loads after it; those ask for
    cache_modifier ".cg" too, which Triton's asynchronous copies may not keep)."""
    seen = tl.atomic_add(p_flag, 0, sem="acquire")
    while seen <= step:
        seen = tl.atomic_add(p_flag, 0, sem="acquire")
