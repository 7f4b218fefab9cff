"""The five operators of docs/operators.md, declared once for validation, generation and checks.

Adding an operator means adding one declaration here (plus its reference module, its kernel
folder, its registration module ``harness/impls/<op>.py`` and its suite entries). Domains name
the generators in ``harness.cases.DOMAINS``; ``options`` are the values a hypothesis case may
draw for each option, and ``kwargs`` which of those options are passed to the function as
keyword arguments (the rest choose a layout, like a per-channel beta).
"""

from __future__ import annotations

import math
from typing import Any

from references.spec import Input, Operator

__all__ = ["OPERATORS", "DELTA_RULE", "GLA", "TTT", "TITANS", "LOG_LINEAR", "get_operator"]


def _opt(name: str, default: Any = False):
    return lambda case: case.options.get(name, default)


def _bool_arg(op: str, args: dict, name: str) -> None:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise TypeError(f"{op}: '{name}' must be a bool, got {value!r}")


def _check_minibatch(op: str, args: dict) -> None:
    chunk_size, eps = args.get("chunk_size", 16), args.get("eps", 1e-6)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: 'chunk_size' must be a positive int, got {chunk_size!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: 'eps' must be a positive float, got {eps!r}")


def _delta_rule_check(dims: dict, args: dict) -> None:
    _bool_arg("delta_rule", args, "use_qk_l2norm_in_kernel")


def _gla_check(dims: dict, args: dict) -> None:
    _bool_arg("gla", args, "reverse")


def _log_linear_check(dims: dict, args: dict) -> None:
    H, G = dims["H"], dims["G"]
    if H % G:
        raise ValueError(
            f"log_linear_attn: the value heads H={H} must be a multiple of the q/k groups G={G}"
        )
    need = levels_needed(dims["max_len"])
    if dims["L"] < need:
        raise ValueError(
            f"log_linear_attn: 'level_scales' needs L >= ceil(log2 T) + 1 = {need} levels for "
            f"sequences of length {dims['max_len']}, got L={dims['L']}"
        )
    if args.get("initial_state") is not None or args.get("output_final_state"):
        raise ValueError(
            "log_linear_attn: carrying per-level states across calls is not supported yet; "
            "pass initial_state=None and output_final_state=False"
        )


def levels_needed(length: int) -> int:
    """Levels used by a sequence of this length: lvl(t, s) <= bit_length(length - 1)."""
    return max(length - 1, 0).bit_length() + 1


LOG_GATE = (-math.inf, 0.0)  # log-space forget gates: exp(g) <= 1
_QK = ("B", "T", "H", "K")
_V = ("B", "T", "H", "V")
_D = ("B", "T", "H", "D")
_initial = lambda case: case.initial_state  # noqa: E731

DELTA_RULE = Operator(
    name="delta_rule",
    title="Delta rule (DeltaNet)",
    inputs=(
        Input("q", (_QK,), lambda c: "normal" if c.options.get("use_qk_l2norm_in_kernel") else "unit"),
        Input("k", (_QK,), lambda c: "normal" if c.options.get("use_qk_l2norm_in_kernel") else "unit"),
        Input("v", (_V,), "normal"),
        Input("beta", (("B", "T", "H"), _V), "unit_interval", pick=lambda c: int(c.options.get("beta_per_channel", False))),
        Input("initial_state", (("N", "H", "K", "V"),), "normal", required=False, state=True, present=_initial),
    ),
    outputs=("o", "final_state"),
    reference="references.delta_rule:naive_recurrent_delta_rule",
    chunk_reference="references.delta_rule:chunk_delta_rule_ref",
    dims=("B", "T", "H", "K", "V"),
    options={"use_qk_l2norm_in_kernel": (False, True), "beta_per_channel": (False, True)},
    kwargs=("use_qk_l2norm_in_kernel",),
    extra_check=_delta_rule_check,
)

GLA = Operator(
    name="gla",
    title="Gated linear attention",
    inputs=(
        Input("q", (_QK,), "normal"),
        Input("k", (_QK,), "normal"),
        Input("v", (_V,), "normal"),
        Input("gk", (_QK,), "log_gate", required=False, bounds=LOG_GATE),
        Input("gv", (_V,), "log_gate", required=False, present=_opt("gv"), bounds=LOG_GATE),
        Input("initial_state", (("N", "H", "K", "V"),), "normal", required=False, state=True, present=_initial),
    ),
    outputs=("o", "final_state"),
    reference="references.gla:naive_recurrent_gla",
    chunk_reference="references.gla:chunk_gla_ref",
    dims=("B", "T", "H", "K", "V"),
    gated=True,
    options={"gv": (False, True), "reverse": (False, True)},
    kwargs=("reverse",),
    extra_check=_gla_check,
)

TTT = Operator(
    name="ttt",
    title="TTT-Linear (LayerNorm + residual inner model)",
    inputs=(
        Input("q", (_D,), "normal"),
        Input("k", (_D,), "normal"),
        Input("v", (_D,), "normal"),
        Input("w", (("H", "D"),), "ln_weight"),
        Input("b", (("H", "D"),), "ln_bias"),
        Input("eta", (("B", "T", "H", 1),), "learning_rate"),
        Input("initial_state", (("N", "H", "D", "D"),), "small", required=False, state=True, present=_initial),
        Input("initial_state_bias", (("N", "H", 1, "D"),), "small", required=False, state=True, present=_initial),
    ),
    outputs=("o", "final_state", "final_state_bias"),
    reference="references.ttt:naive_ttt_linear",
    chunk_reference="references.ttt:chunk_ttt_linear_ref",
    dims=("B", "T", "H", "D"),
    options={"chunk_size": (16, 4, 8, 32, 64)},
    kwargs=("chunk_size",),
    extra_check=lambda dims, args: _check_minibatch("ttt", args),
)

TITANS = Operator(
    name="titans",
    title="Titans (neural memory with momentum and forgetting)",
    inputs=(
        Input("q", (_D,), "normal"),
        Input("k", (_D,), "normal"),
        Input("v", (_D,), "normal"),
        Input("w", (("H", "D"),), "ln_weight"),
        Input("b", (("H", "D"),), "ln_bias"),
        Input("theta", (("B", "T", "H"),), "learning_rate", bounds=(0.0, math.inf)),
        Input("alpha", (("B", "T", "H"),), "forget", bounds=(0.0, 1.0)),
        Input("eta", (("B", "T", "H"),), "keep", bounds=(0.0, 1.0)),
        Input("initial_state", (("N", "H", "D", "D"),), "small", required=False, state=True, present=_initial),
        Input("initial_momentum", (("N", "H", "D", "D"),), "small", required=False, state=True, present=_initial),
    ),
    outputs=("o", "final_state", "final_momentum"),
    reference="references.titans:naive_titans_linear",
    chunk_reference="references.titans:chunk_titans_linear_ref",
    dims=("B", "T", "H", "D"),
    gated=True,
    options={"chunk_size": (16, 4, 8, 32, 64)},
    kwargs=("chunk_size",),
    extra_check=lambda dims, args: _check_minibatch("titans", args),
)

LOG_LINEAR = Operator(
    name="log_linear_attn",
    title="Log-linear attention (Fenwick-tree hierarchy of states)",
    inputs=(
        Input("q", (("B", "T", "G", "K"),), "normal"),
        Input("k", (("B", "T", "G", "K"),), "normal"),
        Input("v", (_V,), "normal"),
        Input("g", (("B", "T", "H"),), "log_gate", bounds=LOG_GATE),
        Input("level_scales", (("B", "T", "H", "L"),), "unit_interval"),
        Input("initial_state", (("N", "H", "K", "V"),), "normal", required=False, state=True, present=lambda c: False),
    ),
    outputs=("o", "final_state"),
    reference="references.log_linear_attn:naive_log_linear_attn",
    chunk_reference="references.log_linear_attn:chunk_log_linear_attn_ref",
    dims=("B", "T", "G", "H", "K", "V", "L"),
    has_state=False,
    gated=True,
    extra_check=_log_linear_check,
)

OPERATORS: dict[str, Operator] = {op.name: op for op in (DELTA_RULE, GLA, TTT, TITANS, LOG_LINEAR)}


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise KeyError(f"unknown operator {name!r}; known: {', '.join(OPERATORS)}") from None
