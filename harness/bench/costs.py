"""Cost models: the floating-point work and the minimum memory traffic of each operator.

``harness bench`` divides these by the measured time to report TFLOP/s and GB/s, and compares
those with the device's measured ceilings (``harness.bench.ceilings``). One function per operator,
its formula in its docstring in the notation of docs/operators.md (B batch, T tokens per sequence,
H heads, K/V or D head dims, G q/k groups, L levels, C the chunk or mini-batch size).

Conventions, shared by every model:

* **FLOPs of the chunked algorithm**: 2 per multiply-add of its matrix products, counted on
  full tiles (a masked C x C product counts all C^2 entries, as a tile kernel computes them).
  Element-wise work (gates, exp, LayerNorm, masks) is left out: it is O(T D), the products are
  O(T D (C + D)). Every implementation of an operator is charged the same count, so the
  TFLOP/s of a step-by-step reference is "the chunked algorithm's work per second", not what
  that reference executes. Chunk sizes: 64 for the delta rule, GLA and log-linear attention
  (a tiling choice); the mini-batch ``chunk_size`` (default 16, part of the math) for TTT and
  Titans. Token counts are exact: a partial last chunk counts its tokens only.
* **Backward = 2 x forward** FLOPs (each product P = A B of the forward needs dA = dP B^T and
  dB = A^T dP); fwdbwd = 3 x forward.
* **Minimum bytes**: every input read once and every output written once, in the input dtype
  (per-sequence states in float32). Forward: the inputs, and ``o``. Backward: the inputs and
  ``do`` read, one gradient per input written. fwdbwd = forward + backward: in training the
  backward can start only once the loss is known, so it reads its inputs again. With states,
  the forward also reads ``initial_state`` and writes the final state; the backward reads
  ``initial_state`` and the final state's gradient and writes ``d initial_state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
STATE_ITEMSIZE = 4  # states are float32
CHUNK = 64  # chunk size of the delta rule, GLA and log-linear models
MINIBATCH = 16  # default mini-batch of TTT and Titans
MODES = ("fwd", "bwd", "fwdbwd")
BWD_FLOPS_FACTOR = 2


@dataclass(frozen=True)
class Work:
    """One operator call, forward: FLOPs, and bytes of its inputs, its output and one set of
    its per-sequence states."""

    flops: float
    inputs: float
    output: float
    state: float = 0.0


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float


def delta_rule_work(dims: Mapping[str, int], itemsize: int, options: Mapping[str, Any]) -> Work:
    """Delta rule, chunks of C = 64 (WY form).

    Per token and head: the chunk's ``A = tril(diag(beta) K K^T)`` row (2CK), its share of the
    triangular solve ``(I + A)^{-1}`` (C^3/3 multiply-adds per chunk: 2C^2/3), ``w = A^{-1}
    diag(beta) K`` and ``u = A^{-1} diag(beta) V`` rows (2CK + 2CV), the state walk
    ``v' = u - w S`` and ``S += K^T v'`` (4KV), and the output ``o = Q S + tril(Q K^T) v'``
    (2KV + 2CK + 2CV)::

        FLOPs = B H T (6CK + 4CV + 2C^2/3 + 6KV)
        bytes = e (B T H (2K + V) + |beta| + B T H V) [+ 4 B H K V per state]

    with e the dtype's bytes and ``|beta| = B T H`` (``B T H V`` per channel).
    """
    B, T, H, K, V, C = dims["B"], dims["T"], dims["H"], dims["K"], dims["V"], CHUNK
    beta = B * T * H * (V if options.get("beta_per_channel") else 1)
    return Work(flops=B * H * T * (6 * C * K + 4 * C * V + 2 * C * C / 3 + 6 * K * V),
                inputs=itemsize * (B * T * H * (2 * K + V) + beta),
                output=itemsize * B * T * H * V,
                state=STATE_ITEMSIZE * B * H * K * V)


def gla_work(dims: Mapping[str, int], itemsize: int, options: Mapping[str, Any]) -> Work:
    """GLA, chunks of C = 64.

    Per token and head: the intra-chunk scores ``(Q e^{G}) (K e^{-G})^T`` row (2CK) times V
    (2CV), the inter-chunk read-out ``(Q e^{G}) S`` (2KV) and the state update
    ``S = diag(e^{G_C}) S + (K e^{G_C - G})^T V`` (2KV)::

        FLOPs = B H T (2CK + 2CV + 4KV)
        bytes = e B T H (3K + V [+ V for gv] + V) [+ 4 B H K V per state]

    (q, k, gk, v, optional gv read; o written).
    """
    B, T, H, K, V, C = dims["B"], dims["T"], dims["H"], dims["K"], dims["V"], CHUNK
    gv = V if options.get("gv") else 0
    return Work(flops=B * H * T * (2 * C * K + 2 * C * V + 4 * K * V),
                inputs=itemsize * B * T * H * (3 * K + V + gv),
                output=itemsize * B * T * H * V,
                state=STATE_ITEMSIZE * B * H * K * V)


def ttt_work(dims: Mapping[str, int], itemsize: int, options: Mapping[str, Any]) -> Work:
    """TTT-Linear, mini-batches of C = chunk_size (default 16), dual form.

    Per token and head: ``Z = K W`` (2D^2), ``Q W`` (2D^2), ``Q K^T`` row (2CD), the running
    sums ``(eta (tril(Q K^T) + tril(1))) G`` as one product (2CD) and the weight update
    ``W -= eta_C K^T G`` (2D^2)::

        FLOPs = B H T (6D^2 + 4CD)
        bytes = e (B T H (3D + 1) + 2 H D + B T H D) [+ 4 B H (D^2 + D) per state]

    (q, k, v, eta, LayerNorm w and b read; o written; states W and hb).
    """
    B, T, H, D = dims["B"], dims["T"], dims["H"], dims["D"]
    C = options.get("chunk_size", MINIBATCH)
    return Work(flops=B * H * T * (6 * D * D + 4 * C * D),
                inputs=itemsize * (B * T * H * (3 * D + 1) + 2 * H * D),
                output=itemsize * B * T * H * D,
                state=STATE_ITEMSIZE * B * H * (D * D + D))


def titans_work(dims: Mapping[str, int], itemsize: int, options: Mapping[str, Any]) -> Work:
    """Titans, mini-batches of C = chunk_size (default 16), matrix form.

    Per token and head: ``K M'`` (2D^2), ``Q M'`` and ``Q S`` (4D^2), ``Q K^T`` row (2CD), its
    weighted product with G (2CD), the decay products ``P = A E`` (C x C x (C + 1) per
    mini-batch: 2C(C + 1)), and the updates of M and S, ``K^T diag(.) G`` twice (4D^2)::

        FLOPs = B H T (10D^2 + 4CD + 2C(C + 1))
        bytes = e (B T H (3D + 3) + 2 H D + B T H D) [+ 4 B H 2 D^2 per state]

    (q, k, v, theta, alpha, eta, w, b read; o written; states M and S).
    """
    B, T, H, D = dims["B"], dims["T"], dims["H"], dims["D"]
    C = options.get("chunk_size", MINIBATCH)
    return Work(flops=B * H * T * (10 * D * D + 4 * C * D + 2 * C * (C + 1)),
                inputs=itemsize * (B * T * H * (3 * D + 3) + 2 * H * D),
                output=itemsize * B * T * H * D,
                state=STATE_ITEMSIZE * B * H * 2 * D * D)


def popcount_sum(T: int, C: int) -> int:
    """``sum_{t < T} popcount(t // C)``: over tokens, the non-empty Fenwick levels of the chunk
    each token sits in (chunk n reads one state per set bit of n)."""
    full, rest = divmod(T, C)
    # sum_{n < full} popcount(n), bit by bit: bit b is set in 2^b of every 2^(b+1) numbers
    total, b = 0, 0
    while (1 << b) <= full:
        period = 1 << (b + 1)
        total += (full // period) * (1 << b) + max(0, full % period - (1 << b))
        b += 1
    return C * total + rest * bin(full).count("1")


def log_linear_work(dims: Mapping[str, int], itemsize: int, options: Mapping[str, Any]) -> Work:
    """Log-linear attention, chunks of C = 64 (Fenwick form).

    Per token and head: the intra-chunk level-weighted scores row (2CK) times V (2CV), its
    share of the chunk state ``K^T V`` (2KV), and one read-out ``Q S_l`` (2KV) per non-empty
    level l of its chunk n, i.e. popcount(n) of them::

        FLOPs = B H (T (2CK + 2CV + 2KV) + 2KV sum_{t<T} popcount(t // C))
        bytes = e (2 B T G K + B T H V + B T H + B T H L + B T H V)

    (q, k with G groups, v, g, level_scales read; o written; no states carried). The level
    term grows as T log2(T / C) / 2.
    """
    B, T, G, H = dims["B"], dims["T"], dims["G"], dims["H"]
    K, V, L, C = dims["K"], dims["V"], dims["L"], CHUNK
    flops = B * H * (T * (2 * C * K + 2 * C * V + 2 * K * V) + 2 * K * V * popcount_sum(T, C))
    return Work(flops=flops,
                inputs=itemsize * B * T * (2 * G * K + H * V + H + H * L),
                output=itemsize * B * T * H * V)


def softmax_attention_work(dims: Mapping[str, int], itemsize: int,
                           options: Mapping[str, Any]) -> Work:
    """The softmax-attention baseline (causal ``scaled_dot_product_attention``) on an
    operator's q, k, v: its own work, not the operator's.

    Per head: the causal half of ``Q K^T`` (T^2 K) and of ``P V`` (T^2 V)::

        FLOPs = B H T^2 (K + V)
        bytes = e (2 B T G K + 2 B T H V)

    (q, k with G groups (G = H unless the operator groups them), v read; o written; K = V = D
    for TTT and Titans).
    """
    B, T, H = dims["B"], dims["T"], dims["H"]
    K, V = dims.get("K", dims.get("D")), dims.get("V", dims.get("D"))
    G = dims.get("G", H)
    return Work(flops=B * H * T * T * (K + V),
                inputs=itemsize * B * T * (2 * G * K + H * V),
                output=itemsize * B * T * H * V)


MODELS: dict[str, Callable[[Mapping[str, int], int, Mapping[str, Any]], Work]] = {
    "delta_rule": delta_rule_work,
    "gla": gla_work,
    "ttt": ttt_work,
    "titans": titans_work,
    "log_linear_attn": log_linear_work,
    "softmax_attention": softmax_attention_work,
}


def cost(op: str, dims: Mapping[str, int], dtype: str, mode: str,
         options: Mapping[str, Any] | None = None, states: bool = False) -> Cost:
    """FLOPs and minimum bytes of one call of ``op`` in ``mode`` (fwd, bwd or fwdbwd).

    ``dims`` holds the operator's sizes (``B, T, H, K, V`` / ``D`` / ``G, L``), ``options``
    its layout options (``beta_per_channel``, ``gv``, ``chunk_size``), ``states`` whether an
    initial state goes in and the final state comes out.
    """
    if op not in MODELS:
        raise ValueError(f"cost: unknown operator {op!r}; known: {', '.join(MODELS)}")
    if dtype not in ITEMSIZE:
        raise ValueError(f"cost: unknown dtype {dtype!r}; known: {', '.join(ITEMSIZE)}")
    if mode not in MODES:
        raise ValueError(f"cost: mode must be one of {', '.join(MODES)}, got {mode!r}")
    w = MODELS[op](dims, ITEMSIZE[dtype], options or {})
    fwd = Cost(w.flops, w.inputs + w.output + (2 * w.state if states else 0))
    bwd = Cost(BWD_FLOPS_FACTOR * w.flops,
               2 * w.inputs + w.output + (3 * w.state if states else 0))
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return Cost(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes)
