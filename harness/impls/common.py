"""What every operator's registration module shares.

* :func:`references`: the step-by-step reference ``naive`` (the ground truth the checks compare
  against) and the chunked pure-PyTorch reference ``chunk_ref`` of an operator.
* :func:`triton_available`: whether our Triton kernels can run here.
* :func:`fla`: a peer from fla-core 0.6.0 (flash-linear-attention), available when ``fla``
  imports; the adapter takes the operator's canonical keyword arguments
  (``references/operators.py``), returns its output tuple, and declines through ``supports``
  the cases fla's function cannot do (``harness check`` reports them as skipped instead of
  failing them). What fla lacks and gets wrong, operator by operator: docs/operators.md.
* :func:`sdpa`: torch's causal ``scaled_dot_product_attention``, registered under every
  operator with kind ``baseline``: ``harness bench`` times it beside the linear-attention
  kernels, ``harness check`` leaves it out (it computes different math).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any, Callable

from harness.implementation import Implementation
from references.operators import OPERATORS
from references.spec import Operator

# The dtypes a Triton kernel (ours or a peer's) takes: float64 has no tensor-core path.
KERNEL_DTYPES = ("float32", "float16", "bfloat16")


def references(op: Operator) -> list[Implementation]:
    """The operator's two references: the truth and the chunked O(T)-memory form."""
    return [
        Implementation(op=op.name, name="naive", kind="reference", target=op.reference,
                       description="step-by-step recurrence of docs/operators.md (ground truth)"),
        Implementation(op=op.name, name="chunk_ref", kind="reference", target=op.chunk_reference,
                       description="chunked pure-PyTorch form, O(T) memory"),
    ]


def triton_available() -> str | None:
    """None when triton imports (on the CPU it runs through its interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton does not import: {exc!r}"
    return None


# ---------------------------------------------------------------- fla-core 0.6.0
def _fla_available() -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "fla-core is not installed (pip install 'linattn-harness[peers]')"
    return None


@functools.cache
def fla_imports(module: str) -> str | None:
    """None when fla is installed and ``module`` imports, else why not. (fla-core 0.6.0's
    fla.ops.delta_rule.parallel does not: it imports fwd_prepare_T, which its wy_fast no
    longer has; seen on an H100, 2026-11-23.)"""
    why = _fla_available()
    if why is None:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
            why = f"{module} does not import: {type(exc).__name__}: {exc}"
    return why


def fla(op: str, name: str, function: str, dtypes: tuple[str, ...], *,
        adapter: Callable[..., Any] | None = None, backward: bool = True,
        supports: Callable[[Any], str | None] | None = None) -> Implementation:
    """fla's ``function`` ("module:name") as a peer of ``op``, called as it is or through
    ``adapter`` (our arguments to fla's)."""
    module, _, attr = function.partition(":")
    return Implementation(
        op=op, name=name, kind="peer", target=adapter or function, devices=("cuda",),
        dtypes=dtypes, description=f"fla-core {attr}", backward=backward,
        available=functools.partial(fla_imports, module), supports=supports)


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


def _sdpa_supports(case) -> str | None:
    if case.seqlens is not None or case.initial_state or case.output_final_state:
        return "no cu_seqlens or states in the softmax baseline"
    return None


def sdpa(op_name: str) -> Implementation:
    """The softmax-attention speed baseline in the argument list of ``op_name``."""
    n_outputs = len(OPERATORS[op_name].outputs)

    def target(q, k, v, scale=None, **_ignored):
        return sdpa_attention(q, k, v, scale=scale, n_outputs=n_outputs)

    target.__doc__ = f"softmax attention in the argument list of {op_name} (its gates are ignored)"
    return Implementation(
        op=op_name, name="sdpa", kind="baseline", target=target, devices=("cpu", "cuda"),
        description="torch scaled_dot_product_attention, causal (softmax attention: a speed "
                    "baseline, not this operator)",
        supports=_sdpa_supports)
