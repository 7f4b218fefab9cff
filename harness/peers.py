"""Peers and baselines: other code adapted to our API, registered like our own.

fla-core 0.6.0 (flash-linear-attention), when ``fla`` imports. Every adapter takes the
operator's canonical keyword arguments (``harness/operators.py``), returns its output tuple,
and declines through ``supports`` the cases fla's function cannot do (so ``harness check``
reports them as skipped instead of failing them). What fla 0.6.0 has, operator by operator:

* delta rule: ``chunk_delta_rule`` (no float32, no per-channel beta) and
  ``fused_recurrent_delta_rule`` take our arguments unchanged; ``parallel_delta_rule``
  (inference only, K <= 128, no states or varlen) is adapted like our own parallel kernel.
  (``fused_chunk_delta_rule`` only raises "deprecated".)
* GLA: ``fused_recurrent_gla`` takes our arguments unchanged (gk, gv, reverse included);
  ``chunk_gla`` takes the key gate as ``g`` and has no ``gv`` and no ``reverse``.
  (``fused_chunk_gla`` only raises "deprecated".)
* TTT-Linear: ``chunk_ttt_linear`` and ``fused_chunk_ttt_linear`` take our arguments unchanged
  and compute OPERATORS.md section 3 (fla's ``naive.py`` is the same dual form: the learning
  rate of the query position scales the running sum). Their kernels hold one head in one tile
  (D <= 128), tile the mini-batch (chunk_size a power of two >= 16), and have no backward for
  ``cu_seqlens``.
* log-linear attention: ``chunk_log_linear_attn`` takes our arguments unchanged (grouped q/k,
  ``scale=1.0`` default, same Fenwick levels as OPERATORS.md section 5); its kernel needs
  K % 64 == 0, V a power of two, and sequences under 2^17 tokens.
* Titans: **not registered.** ``fla.ops.titans.chunk_titans_linear`` is a pure-PyTorch loop on
  ``[B, H, T, D]`` tensors with positional arguments, no ``scale`` (q is not scaled), no
  initial momentum and no final momentum, and its LayerNorm backward differs from OPERATORS.md
  section 4: it computes ``D * gx - sum(gx) / (D * sigma) - x * sum(gx * x) / (D * sigma)``
  (operator precedence) where the contract has ``(D * gx - sum(gx) - x * sum(gx * x)) /
  (D * sigma)``. Its math is not ours, so checking it against our reference would only
  report that.

The softmax-attention baseline ``sdpa`` (torch's ``scaled_dot_product_attention``, causal) is
registered under every operator with kind ``baseline``: ``harness bench`` times it beside the
linear-attention kernels, ``harness check`` leaves it out (it computes different math).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

from harness.builtin import _parallel_supports
from harness.operators import OPERATORS
from harness.registry import Implementation, register

FLA_MAX_HEAD = 128  # fla's TTT and parallel delta rule kernels hold one head in one tile
FLA_LOG_LINEAR_BLOCK_K = 64
FLA_LOG_LINEAR_MAX_T = 2**17


def _fla_available() -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "fla-core is not installed (pip install 'linattn-harness[peers]')"
    return None


@functools.cache
def _fla_imports(module: str) -> str | None:
    """None when fla is installed and ``module`` imports, else why not. (fla-core 0.6.0's
    fla.ops.delta_rule.parallel does not: it imports fwd_prepare_T, which its wy_fast no
    longer has; seen on the H100, 2026-11-23.)"""
    why = _fla_available()
    if why is None:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
            why = f"{module} does not import: {type(exc).__name__}: {exc}"
    return why


# ---------------------------------------------------------------- what each adapter declines
def _no_per_channel_beta(case) -> str | None:
    return "per-channel beta" if case.options.get("beta_per_channel") else None


def _fla_parallel_supports(case) -> str | None:
    if case.dims["K"] > FLA_MAX_HEAD:
        return f"K > {FLA_MAX_HEAD} in fla's parallel_delta_rule"
    return _parallel_supports(case)


def _fla_chunk_gla_supports(case) -> str | None:
    if case.options.get("gv"):
        return "no value-side gate gv in fla's chunk_gla"
    if case.options.get("reverse"):
        return "no reverse in fla's chunk_gla"
    return None


def _fla_ttt_supports(case) -> str | None:
    chunk = case.options.get("chunk_size", 16)
    if case.dims["D"] > FLA_MAX_HEAD:
        return f"D > {FLA_MAX_HEAD} in fla's TTT kernels"
    if chunk < 16 or chunk & (chunk - 1):
        return f"chunk_size={chunk}: fla's TTT kernels need a power of two >= 16"
    if case.seqlens is not None:
        return "fla's TTT has no backward for cu_seqlens"
    return None


def _fla_log_linear_supports(case) -> str | None:
    K, V = case.dims["K"], case.dims["V"]
    if K % FLA_LOG_LINEAR_BLOCK_K:
        return f"K={K}: fla's chunk_log_linear_attn needs K % {FLA_LOG_LINEAR_BLOCK_K} == 0"
    if V & (V - 1):
        return f"V={V}: fla's chunk_log_linear_attn needs a power of two"
    longest = max(case.seqlens) if case.seqlens else case.dims["T"]
    if longest > FLA_LOG_LINEAR_MAX_T:
        return f"sequences longer than {FLA_LOG_LINEAR_MAX_T} tokens"
    return None


# ---------------------------------------------------------------- adapters
def _fla_parallel_delta_rule(q, k, v, beta, scale=None, initial_state=None,
                             output_final_state=False, use_qk_l2norm_in_kernel=False,
                             cu_seqlens=None):
    """fla's parallel_delta_rule under our arguments (it has no states, varlen or l2norm)."""
    from fla.ops.delta_rule.parallel import parallel_delta_rule

    if initial_state is not None or output_final_state or cu_seqlens is not None \
            or use_qk_l2norm_in_kernel:
        raise ValueError("fla_parallel (delta_rule): parallel_delta_rule takes no initial_state, "
                         "output_final_state, cu_seqlens or use_qk_l2norm_in_kernel")
    return parallel_delta_rule(q, k, v, beta, scale=scale)[0], None


def _fla_chunk_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                   output_final_state=False, reverse=False, cu_seqlens=None):
    """fla's chunk_gla under our arguments: our key gate ``gk`` is its ``g``."""
    from fla.ops.gla import chunk_gla

    if gk is None or gv is not None or reverse:
        raise ValueError(f"fla_chunk (gla): chunk_gla needs a key gate gk and takes no gv and "
                         f"no reverse; got gk={'None' if gk is None else 'tensor'}, "
                         f"gv={'None' if gv is None else 'tensor'}, reverse={reverse}")
    return chunk_gla(q, k, v, gk, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)


FLA = [
    # (operator, our name, fla's function, our adapter (None: called as is), dtypes,
    #  has a backward, declines)
    ("delta_rule", "fla_chunk", "fla.ops.delta_rule:chunk_delta_rule", None,
     ("float16", "bfloat16"), True, _no_per_channel_beta),
    ("delta_rule", "fla_fused_recurrent", "fla.ops.delta_rule:fused_recurrent_delta_rule", None,
     ("float32", "float16", "bfloat16"), True, None),
    ("delta_rule", "fla_parallel", "fla.ops.delta_rule.parallel:parallel_delta_rule",
     _fla_parallel_delta_rule, ("float32", "float16", "bfloat16"), False, _fla_parallel_supports),
    ("gla", "fla_chunk", "fla.ops.gla:chunk_gla", _fla_chunk_gla,
     ("float32", "float16", "bfloat16"), True, _fla_chunk_gla_supports),
    ("gla", "fla_fused_recurrent", "fla.ops.gla:fused_recurrent_gla", None,
     ("float32", "float16", "bfloat16"), True, None),
    ("ttt", "fla_chunk", "fla.ops.ttt:chunk_ttt_linear", None,
     ("float32", "float16", "bfloat16"), True, _fla_ttt_supports),
    ("ttt", "fla_fused_chunk", "fla.ops.ttt:fused_chunk_ttt_linear", None,
     ("float32", "float16", "bfloat16"), True, _fla_ttt_supports),
    ("log_linear_attn", "fla_chunk", "fla.ops.log_linear_attn:chunk_log_linear_attn", None,
     ("float32", "float16", "bfloat16"), True, _fla_log_linear_supports),
]

for _op, _name, _function, _adapter, _dtypes, _backward, _supports in FLA:
    register(Implementation(
        op=_op, name=_name, kind="peer", target=_adapter or _function, devices=("cuda",),
        dtypes=_dtypes, description=f"fla-core {_function.split(':')[1]}", backward=_backward,
        available=functools.partial(_fla_imports, _function.split(":")[0]), supports=_supports,
    ))


# ---------------------------------------------------------------- the softmax baseline
def sdpa_attention(q, k, v, scale=None, n_outputs=2):
    """Causal softmax attention on our layout: ``q, k [B,T,G,K]``, ``v [B,T,H,V]`` (G divides
    H; value head h reads q/k group h // (H/G)), through
    ``torch.nn.functional.scaled_dot_product_attention``. Returns ``(o, None, ...)`` shaped
    like the operator's output tuple. (SDPA shares k/v heads among query heads, not the
    other way round, so grouped q/k are repeated: a copy, only when G < H.)"""
    import torch.nn.functional as F

    H, G = v.shape[2], k.shape[2]
    if G != H:
        q, k = q.repeat_interleave(H // G, dim=2), k.repeat_interleave(H // G, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=scale)
    return (o.transpose(1, 2),) + (None,) * (n_outputs - 1)


def _sdpa_for(op_name: str):
    n_outputs = len(OPERATORS[op_name].outputs)

    def sdpa(q, k, v, scale=None, **_ignored):
        return sdpa_attention(q, k, v, scale=scale, n_outputs=n_outputs)

    sdpa.__doc__ = f"softmax attention in the argument list of {op_name} (its gates are ignored)"
    return sdpa


def _sdpa_supports(case) -> str | None:
    if case.seqlens is not None or case.initial_state or case.output_final_state:
        return "no cu_seqlens or states in the softmax baseline"
    return None


for _op in OPERATORS:
    register(Implementation(
        op=_op, name="sdpa", kind="baseline", target=_sdpa_for(_op),
        devices=("cpu", "cuda"), description="torch scaled_dot_product_attention, causal "
        "(softmax attention: a speed baseline, not this operator)",
        supports=_sdpa_supports,
    ))
