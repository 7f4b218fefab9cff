"""Index helpers every kernel shares: where a sequence starts and ends, how its chunks are
numbered, and the dot precision for an input dtype."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First and one-past-last token (int64) of sequence i_n in the flattened [B*T] rows."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def walk_bounds(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, eos, NT, c0) of sequence i_n for a walk over its chunks: its tokens, its chunk
    count, and the index of its first chunk in the per-chunk state tensors."""
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, eos, tl.cdiv(eos - bos, BT), c0


@triton.jit
def chunk_bounds(cu_seqlens, chunk_indices, i_c, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, eos, i_t) of the chunk a program handles: its sequence's first and one-past-last
    token and the chunk's index within the sequence. Without varlen, i_c is the chunk index
    and i_b the batch row; with varlen, i_c indexes ``chunk_indices`` (sequence, chunk)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_t = i_c.to(tl.int64)
        bos = i_b.to(tl.int64) * T
        eos = bos + T
    return bos, eos, i_t


@triton.jit
def chunk_rows(cu_seqlens, chunk_indices, i_c, i_bh, T, H: tl.constexpr, BT: tl.constexpr,
               IS_VARLEN: tl.constexpr):
    """(i_t, m_t, row0) of the chunk program (i_c, i_bh): the chunk's index in its sequence,
    which of its BT rows hold tokens, and the row (int64, of the [B*T*H] rows) of its first
    token: token t of head i_h of a [B, T, H, D] tensor x starts at x + row0 * D + t * H * D.
    Kernels add the int64 row0 to the pointer once and keep the offsets within the chunk
    int32 (load_rows): int64 offsets per element cost enough registers to spill."""
    bos, eos, i_t = chunk_bounds(cu_seqlens, chunk_indices, i_c, i_bh // H, T, BT, IS_VARLEN)
    m_t = i_t * BT + tl.arange(0, BT) < eos - bos
    return i_t, m_t, (bos + i_t * BT) * H + i_bh % H


@triton.jit
def chunk_index(i_c, i_bh, i_t, T, H: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index (int64) among all chunks of the chunk program (i_c, i_bh) handles, i_t its chunk
    within the sequence: how per-chunk tensors (states h, anchors) are numbered."""
    if IS_VARLEN:
        return i_c.to(tl.int64)
    else:
        return (i_bh // H).to(tl.int64) * tl.cdiv(T, BT) + i_t


@triton.jit
def add_row(p, b_x, m, NV: tl.constexpr):
    """p[m] += b_x for a float32 sum over NV tiles of another dimension (the sweeps' value
    tiles): a store when there is one tile (the sum is then deterministic), else a relaxed
    atomic add into a zeroed buffer (NV terms in the order the tiles arrive: a few ulps)."""
    if NV == 1:
        tl.store(p, b_x, mask=m)
    else:
        tl.atomic_add(p, b_x, mask=m, sem="relaxed")


@triton.jit
def add_to(p, b_x, m, NV: tl.constexpr):
    """p[m] += b_x onto what p holds, for a float32 sum over NV tiles of another dimension: a
    load, add and store when there is one tile, else a relaxed atomic add from every tile."""
    if NV == 1:
        tl.store(p, b_x + tl.load(p, mask=m, other=0.), mask=m)
    else:
        tl.atomic_add(p, b_x, mask=m, sem="relaxed")

@triton.jit
def load_rows(x, o_c, m_t, o_d, D: tl.constexpr, H: tl.constexpr):
    """[BT, BD] tile of a [.., H, D] tensor: x points at the chunk's first row (row t at
    x + t * H * D), rows o_c where m_t, columns o_d < D; zeros elsewhere."""
    return load_rows_as(x, o_c, m_t, o_d, D, H, "", "")


@triton.jit
def load_rows_as(x, o_c, m_t, o_d, D: tl.constexpr, H: tl.constexpr, EVICT: tl.constexpr,
                 CACHE: tl.constexpr):
    """load_rows with tl.load's eviction_policy EVICT and cache_modifier CACHE (a jit
    function's default argument does not reach the compiler as a constexpr, hence two
    functions)."""
    return tl.load(x + o_c[:, None] * (H * D) + o_d[None, :],
                   mask=m_t[:, None] & (o_d < D)[None, :], other=0., eviction_policy=EVICT,
                   cache_modifier=CACHE)


@triton.jit
def load_cols(x, o_c, m_t, o_d, D: tl.constexpr, H: tl.constexpr):
    """The same tile transposed, [BD, BT], loaded as such."""
    return tl.load(x + o_c[None, :] * (H * D) + o_d[:, None],
                   mask=(o_d < D)[:, None] & m_t[None, :], other=0.)


@triton.jit
def store_rows(x, b_x, o_c, m_t, o_d, D: tl.constexpr, H: tl.constexpr):
    """Store a [BT, BD] tile where load_rows reads one, in x's dtype."""
    tl.store(x + o_c[:, None] * (H * D) + o_d[None, :], b_x.to(x.dtype.element_ty),
             mask=m_t[:, None] & (o_d < D)[None, :])


# The narrowest tile of a head dimension in the chunk kernels: 64, masked past the head dim.
# Narrower tiles met three Triton 3.6 miscompiles (bf16 and fp16 at 4 warps; float32 and the
# interpreter right, so no CPU test can see them), each relative error ~1:
#   - H100: the dq/dk kernel with 16-wide key tiles (K = 16, V >= 32)
#   - H200: chunk_fwd_o with a 32-wide value tile under a 64-wide key tile (K = 64 or 48, V = 32;
#     compute-sanitizer: an out-of-bounds __shared__ read), and the dq/dk kernel at K = 32, V = 64
#   - H200: wy_bwd at K = 32, V = 64 (dk 1.9, dbeta 1.2; 8 warps did not help) and an illegal
#     address in it at K = 16, V = 64
# With every tile 64 wide every tiling class came out right on the H200 (K, V in {16, 32, 64,
# 128, 256} and three pairs with 48 and 100, 2026-12-02; reports/delta_rule.md, Triton
# miscompiles; rerun with `harness check delta_rule --family tiling --dtype bfloat16,float16`).
# Head dims of 64 and up keep the tiles they had; under 64 the kernels do up to 4x the (masked) work of a
# 16-wide tile, at no cost that matters.
MIN_TILE = 64


def tile(D: int, cap: int = 64) -> int:
    """Tile width for a head dimension of size D: a power of two in [MIN_TILE, cap] (with the
    default cap, 64 for every D: a head dim over 64 is walked in 64-wide blocks)."""
    return min(cap, max(MIN_TILE, triton.next_power_of_2(D)))


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, BT: int):
    """How the chunk kernels see a batch.

    Returns (N, NT, chunk_indices, chunk_offsets): N sequences; NT chunks per batch row
    (without varlen) or in all (with varlen); chunk_indices [NT, 2] int32 (sequence, chunk in
    sequence) and chunk_offsets [N + 1] int32 (first chunk of each sequence), or None without
    varlen (there chunk i_t of row b is b * NT + i_t).
    """
    if cu_seqlens is None:
        return B, triton.cdiv(T, BT), None, None
    lens = torch.diff(cu_seqlens).tolist()
    counts = [triton.cdiv(n, BT) for n in lens]
    pairs = [(i_n, i_t) for i_n, c in enumerate(counts) for i_t in range(c)]
    device = cu_seqlens.device
    chunk_indices = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=device)[:len(pairs)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    chunk_offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
    return len(lens), len(pairs), chunk_indices.reshape(-1, 2), chunk_offsets


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's input_precision for float32 operands: exact ("ieee") for float32 inputs, where
    TF32's 10-bit mantissa would cost ~1e-3; three TF32 passes ("tf32x3", ~1e-6) for the
    float32 intermediates of half-precision inputs that are kept in float32 on purpose (the
    triangular solve). Elsewhere half-precision inputs multiply in their own dtype, float32
    intermediates cast down to it, with float32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32x3"


def mode_for(setting, dtype: torch.dtype) -> str:
    """A kernel's product mode for inputs of ``dtype`` from a module setting: a mode, None, or a
    dict from dtype names ("float16", "bfloat16") to modes; "" where none is given."""
    if isinstance(setting, dict):
        setting = setting.get(str(dtype).removeprefix("torch."))
    return setting or ""


# The modes of dot_mixed and minibatch.dot_state ("": one product at the kernel's precision).
MIXED_MODES = ("", "tf32", "tf32x2", "split", "split_trunc", "split3", "round")


def mixed_mode(name: str, setting, dtype: torch.dtype) -> str:
    """mode_for of a product-mode setting named ``name``, which must give one of MIXED_MODES:
    a clear error before any launch rather than a kernel's fallback form."""
    mode = mode_for(setting, dtype)
    if mode not in MIXED_MODES:
        raise ValueError(f"{name} must name one of {', '.join(map(repr, MIXED_MODES[1:]))} or "
                         f"None per dtype, got {mode!r} for {dtype}")
    return mode


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Whether this module's kernels (and the kernels of every module imported with it) were built
# for Triton's interpreter: triton.jit reads TRITON_INTERPRET when it decorates a kernel.
INTERPRETED = interpreted()


# The dtypes the kernels take (float64 has no tensor-core path; the references run it).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_launchable(name: str, x: torch.Tensor) -> None:
    """A clear error before any launch when the kernels cannot run ``x`` (q, whose dtype k and v
    share): a dtype they do not take, or a device they cannot run on: CPU tensors need Triton's
    interpreter switched on before the kernels were imported (else Triton fails deep in the
    launch with "0 active drivers"); anything else needs CUDA."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: q, k, v must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if INTERPRETED:
            return
        raise ValueError(
            f"{name}: the inputs are on the CPU, where Triton kernels run only through Triton's "
            f"interpreter, which was off when the kernels were imported: set TRITON_INTERPRET=1 "
            f"in the environment before the first import of triton or kernels (e.g. "
            f"`TRITON_INTERPRET=1 python ...`; slow: for checking, not for speed), or move the "
            f"inputs to a CUDA device")
    raise ValueError(f"{name}: the inputs are on {x.device}; the Triton kernels run on CUDA "
                     f"tensors (or on the CPU through Triton's interpreter)")


def processors(device: torch.device) -> float:
    """The streaming multiprocessors of a CUDA device, for launches that size themselves by
    what stays resident; infinite on the CPU (Triton's interpreter runs one program at a
    time, so there is no such limit)."""
    if device.type != "cuda":
        return float("inf")
    return torch.cuda.get_device_properties(device).multi_processor_count


def tuning(configs: list) -> list:
    """Autotune configs: all on a GPU; the first alone under the interpreter (where timing
    configs means nothing and every extra config costs seconds) and when LINATTN_AUTOTUNE=0
    (read at import). Configs differ in tiling and warps, so in summation order only (a few
    ulps); numerical checks pin the first one: reproducible, one compile per kernel and shape."""
    pinned = interpreted() or os.environ.get("LINATTN_AUTOTUNE", "1") == "0"
    return configs[:1] if pinned else configs


def nh_bucket(N: int, H: int) -> int:
    """The sweeps' autotune key for N * H (sequences x heads): programs per value tile, which
    decide the best tile width, in powers of two up to 1024."""
    return min(triton.next_power_of_2(N * H), 1024)


def zero_before_run(*names: str):
    """An autotune pre_hook that zeroes the named buffers (those given: None is skipped) before
    each run: kernels that add into a buffer would otherwise sum every config's run."""
    def hook(nargs, reset_only=False):
        for name in names:
            if nargs[name] is not None:
                nargs[name].zero_()
    return hook

# Warps of the per-chunk kernels (one program per chunk and tile). With 4 warps the ones holding
# three [64, 64] float32 accumulators spill to local memory (ptxas: 768-992 bytes of stack for
# dqk and wy_bwd at K = V = 128), with 8 they do not; which is faster is timed per shape.
CHUNK_CONFIGS = tuning([triton.Config({}, num_warps=w) for w in (4, 8)])


# Causality under non-finite input. A NaN or inf at token t must reach no output before t. The
# dense products inside a chunk multiply masked-out (future) entries by 0, and 0 * NaN = NaN,
# so the stages whose products mix a chunk's rows load through `finite_part` (non-finite
# elements read as 0: finite inputs unchanged, bit for bit) and then set what the math makes
# non-finite to NaN themselves (`poison_rows`): per column, the rows at and after the first
# non-finite input row (`first_bad_row`). Kernels take it as the constexpr SAFE, from
# NONFINITE_SAFE at launch; False compiles the stages as they were before (x unchanged, the
# reductions unused and removed).
#
# Its cost, H200 (B=2 H=16 K=V=128 bf16, chunk_delta_rule, beside fla-core 0.6.0 in one run,
# 2026-12-03, reports/delta_rule.md): forward 0.495 -> 0.988 ms at T=8K and 1.895 -> 3.794 ms
# at 32K (fla 0.547 and 2.093), fwd+bwd 4.780 -> 6.681 ms at 32K (fla 5.934). On until a
# cheaper form is measured (reports/NOTES.md).
NONFINITE_SAFE = True


def nonfinite_safe() -> bool:
    """NONFINITE_SAFE as it is now (read at each launch, so that a switch takes effect)."""
    return NONFINITE_SAFE


@triton.jit
def finite_part(x, SAFE: tl.constexpr):
    """(x with its NaN and +-inf elements replaced by 0, where they were); x unchanged when
    not SAFE."""
    bad = x - x != 0  # NaN - NaN and inf - inf are NaN
    if SAFE:
        x = tl.where(bad, 0., x)
    return x, bad


@triton.jit
def first_bad_row(bad, o_r, NONE: tl.constexpr):
    """[C]: per column of bad [R, C], the least row index o_r [R] where bad; NONE if none."""
    return tl.min(tl.where(bad, o_r[:, None], NONE), axis=0)


@triton.jit
def poison_rows(x, o_r, first, SAFE: tl.constexpr):
    """x [R, C] with the rows o_r >= first (per column, [C]) set to NaN when SAFE."""
    if SAFE:
        x = tl.where(o_r[:, None] >= first[None, :], float("nan"), x)
    return x


@triton.jit
def dot_split(b_a, b_b, PRECISION: tl.constexpr, TRUNC: tl.constexpr = False):
    """b_a @ b_b where one operand is float32 and the other in the inputs' dtype, with the
    float32 one kept to ~16 mantissa bits when that dtype is half precision: x = hi + lo, both
    in the other operand's dtype, and two products (split_halves; with TRUNC the second
    accumulating into the first). (An inverse, a state or a v' rounded to bf16 alone costs
    ~2e-3 of every output it feeds.) Both float32: one exact product."""
    if b_a.dtype == tl.float32 and b_b.dtype == tl.float32:
        return tl.dot(b_a, b_b, input_precision=PRECISION)
    if b_a.dtype == tl.float32:
        b_hi, b_lo = split_halves(b_a, b_b.dtype, TRUNC)
        if TRUNC:
            return tl.dot(b_lo, b_b, tl.dot(b_hi, b_b))
        return tl.dot(b_hi, b_b) + tl.dot(b_lo, b_b)
    b_hi, b_lo = split_halves(b_b, b_a.dtype, TRUNC)
    if TRUNC:
        return tl.dot(b_a, b_lo, tl.dot(b_a, b_hi))
    return tl.dot(b_a, b_hi) + tl.dot(b_a, b_lo)


@triton.jit
def split_halves(x, HALF: tl.constexpr, TRUNC: tl.constexpr):
    """float32 x as (hi, lo) in the half dtype HALF, x = hi + lo to ~16 bits: hi x rounded, or
    with TRUNC for bfloat16 split_bf16's."""
    if TRUNC and HALF == tl.bfloat16:
        return split_bf16(x)
    b_hi = x.to(HALF)
    return b_hi, (x - b_hi.to(tl.float32)).to(HALF)


@triton.jit
def split_bf16(x):
    """float32 x as bfloat16 (hi, lo): hi its leading 8 significant bits, truncated (the upper
    16 bits of its pattern, no rounding instruction), lo = x - hi rounded: ~15 bits kept, one
    less than rounding hi."""
    b_hi, b_r = truncated_bf16(x)
    return b_hi, b_r.to(tl.bfloat16)


@triton.jit
def truncated_bf16(x):
    """float32 x as (hi, x - hi): hi its leading 8 significant bits as bfloat16, truncated (the
    upper 16 bits of its pattern), x - hi exact in float32."""
    b_u = x.to(tl.uint32, bitcast=True)
    b_hi = (b_u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return b_hi, x - (b_u & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def split_thirds(x, HALF: tl.constexpr):
    """float32 x as (hi, mid, lo) in the half dtype HALF, x = hi + mid + lo: for bfloat16 hi
    and mid each the leading 8 bits of what the parts before leave (truncated_bf16), lo the
    rest rounded, all 24 bits kept (bfloat16 has float32's exponents); for float16 each part
    rounded, whole only where the parts stay in float16's range (no part under its 2^-24 step:
    |x| of about 1 and more; over 65504, inf)."""
    if HALF == tl.bfloat16:
        b_hi, b_r = truncated_bf16(x)
        b_mid, b_r = truncated_bf16(b_r)
        return b_hi, b_mid, b_r.to(tl.bfloat16)
    b_hi = x.to(HALF)
    b_r = x - b_hi.to(tl.float32)
    b_mid = b_r.to(HALF)
    return b_hi, b_mid, (b_r - b_mid.to(tl.float32)).to(HALF)


@triton.jit
def dot_split3(b_a, b_b, b_acc=None):
    """b_acc + b_a @ b_b (b_acc None: 0) where one operand is float32 and the other half
    precision: the float32 one as split_thirds' three parts in the other's dtype, three
    products accumulated in turn."""
    if b_a.dtype == tl.float32:
        b_hi, b_mid, b_lo = split_thirds(b_a, b_b.dtype)
        return tl.dot(b_lo, b_b, tl.dot(b_mid, b_b, tl.dot(b_hi, b_b, b_acc)))
    b_hi, b_mid, b_lo = split_thirds(b_b, b_a.dtype)
    return tl.dot(b_a, b_lo, tl.dot(b_a, b_mid, tl.dot(b_a, b_hi, b_acc)))


@triton.jit
def tf32_head(x):
    """x's leading 11 significant bits (TF32's), truncated: exact in TF32, and x minus it exact
    in float32 (13 bits)."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot_tf32x2(b_a, b_b):
    """b_a @ b_b where one operand is float32 and the other half precision: the half one
    widened (exact in TF32: 8 or 11 significant bits, exponents in range), the float32 one as
    tf32_head plus the rest, two TF32 products keeping ~22 bits. As close as three TF32 passes
    ("tf32x3", whose third product is of the half operand's rounding error: 0)."""
    if b_a.dtype == tl.float32:
        b_x = b_b.to(tl.float32)
        b_hi = tf32_head(b_a)
        return (tl.dot(b_hi, b_x, input_precision="tf32")
                + tl.dot(b_a - b_hi, b_x, input_precision="tf32"))
    b_x = b_a.to(tl.float32)
    b_hi = tf32_head(b_b)
    return (tl.dot(b_x, b_hi, input_precision="tf32")
            + tl.dot(b_x, b_b - b_hi, input_precision="tf32"))


@triton.jit
def dot_mixed(b_a, b_b, PRECISION: tl.constexpr, MIXED: tl.constexpr):
    """b_a @ b_b where one operand is float32 and the other half precision, as MIXED says:
    "tf32x2" (dot_tf32x2: ~22 bits kept, two TF32 products), "split" (dot_split: ~16 bits
    kept, two products), "split_trunc" (dot_split's TRUNC: for bfloat16 ~15 bits, fewer
    instructions; float16 as "split"), "split3" (dot_split3: ~24 bits for bfloat16, three
    products), "tf32" (one product in TF32: 11 bits kept, the half
    operand widened exactly) or "round" (the float32 operand rounded to the other's dtype: 8
    bits for bf16). Both float32: one product at PRECISION."""
    if b_a.dtype == tl.float32 and b_b.dtype == tl.float32:
        return tl.dot(b_a, b_b, input_precision=PRECISION)
    if MIXED == "tf32x2":
        return dot_tf32x2(b_a, b_b)
    if MIXED == "split" or MIXED == "split_trunc":
        return dot_split(b_a, b_b, PRECISION, MIXED == "split_trunc")
    if MIXED == "split3":
        return dot_split3(b_a, b_b)
    if MIXED == "tf32":
        return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), input_precision="tf32")
    if b_a.dtype == tl.float32:
        return tl.dot(b_a.to(b_b.dtype), b_b)
    return tl.dot(b_a, b_b.to(b_a.dtype))
