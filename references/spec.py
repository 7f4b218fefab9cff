"""The operator contract: what an operator takes, returns and accepts.

An :class:`Operator` declares each input once (name, shape in the symbols of
docs/operators.md, the domain its values are drawn from, whether gradients flow to it). That
one declaration serves three things:

* argument validation shared by every implementation (:meth:`Operator.validate`), so that a
  reference, a Triton kernel and a peer all reject the same bad input with the same message
  before any computation;
* input generation for the numerical checks (``harness.cases``);
* the gradient checks (which inputs are differentiable).

This is the ground floor of the project: it imports only torch. References and kernels build
on it; the harness builds on all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

# A shape is a tuple of symbols ("B", "T", "H", "K", ...) and literal ints.
Shape = tuple[str | int, ...]


def _always(case: Any) -> bool:
    return True


def _first(case: Any) -> int:
    return 0


@dataclass(frozen=True)
class Input:
    """One tensor argument of an operator.

    ``shapes`` lists the accepted layouts (e.g. beta is ``[B,T,H]`` or ``[B,T,H,V]``);
    ``pick(case)`` says which of them a generated case uses and ``present(case)`` whether an
    optional input is passed at all. ``domain`` names a generator in ``harness.cases.DOMAINS``
    (or is a function of the case returning such a name).
    """

    name: str
    shapes: tuple[Shape, ...]
    domain: str | Callable[[Any], str]
    differentiable: bool = True
    required: bool = True
    state: bool = False  # a per-sequence state [N, ...]; kept float32 by kernels
    present: Callable[[Any], bool] = _always
    pick: Callable[[Any], int] = _first
    bounds: tuple[float, float] | None = None  # the closed interval its values must lie in

    def domain_for(self, case: Any) -> str:
        return self.domain(case) if callable(self.domain) else self.domain


@dataclass(frozen=True)
class Operator:
    """The contract of one operator (docs/operators.md)."""

    name: str
    title: str
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]  # names of the returned tuple's entries, in order
    reference: str  # "module:function" of the step-by-step reference (the ground truth)
    chunk_reference: str  # "module:function" of the chunked O(T)-memory reference
    dims: tuple[str, ...]  # size symbols a case draws, e.g. ("B", "T", "H", "K", "V")
    has_state: bool = True  # takes initial_state / output_final_state
    gated: bool = False  # has decay gates (the long-sequence family drives them hard)
    options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # values a case draws
    kwargs: tuple[str, ...] = ()  # the options passed as keyword arguments (others pick layouts)
    extra_check: Callable[[dict, dict], None] | None = None  # operator-specific validation

    def input(self, name: str) -> Input:
        for inp in self.inputs:
            if inp.name == name:
                return inp
        raise KeyError(name)

    @property
    def differentiable(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs if i.differentiable)

    # ------------------------------------------------------------------ validation
    def validate(self, args: Mapping[str, Any]) -> dict[str, int]:
        """Check the arguments of a call against this contract; return the bound sizes.

        ``args`` maps argument names to values (tensors, ``None`` for absent optional inputs,
        and the keyword options ``scale``, ``cu_seqlens``, ...). Raises ``TypeError`` for a
        wrong type or dtype and ``ValueError`` for a wrong shape, device or value, naming the
        argument, what was expected and what was given.
        """
        dims: dict[str, int] = {}
        device = None
        first_name = None
        main_dtype = None
        for inp in self.inputs:
            x = args.get(inp.name)
            if x is None:
                if inp.required:
                    raise TypeError(f"{self.name}: argument '{inp.name}' is required, got None")
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"{self.name}: '{inp.name}' must be a torch.Tensor, got {type(x).__name__}"
                )
            if not x.dtype.is_floating_point:
                raise TypeError(
                    f"{self.name}: '{inp.name}' must have a floating-point dtype, got {x.dtype}"
                )
            if device is None:
                device, first_name = x.device, inp.name
            elif x.device != device:
                raise ValueError(
                    f"{self.name}: '{inp.name}' is on {x.device} but '{first_name}' is on "
                    f"{device}; all tensors must be on one device"
                )
            if inp.name in ("q", "k", "v"):
                if main_dtype is None:
                    main_dtype = x.dtype
                elif x.dtype != main_dtype:
                    raise TypeError(
                        f"{self.name}: q, k and v must share one dtype; '{inp.name}' is "
                        f"{x.dtype}, expected {main_dtype}"
                    )
            _bind_shape(self.name, inp, x, dims)

        cu_seqlens = args.get("cu_seqlens")
        dims["N"] = dims.get("B", 1)
        if cu_seqlens is not None:
            dims["N"] = _check_cu_seqlens(self.name, cu_seqlens, dims, device)
            dims["max_len"] = int(torch.diff(cu_seqlens).max().item()) if dims["N"] else 0
        else:
            dims["max_len"] = dims.get("T", 0)
        # State inputs were bound with the symbol N; it must match the number of sequences.
        for inp in self.inputs:
            x = args.get(inp.name)
            if inp.state and x is not None and x.shape[0] != dims["N"]:
                raise ValueError(
                    f"{self.name}: '{inp.name}' must have N={dims['N']} rows (one per "
                    f"{'sequence in cu_seqlens' if cu_seqlens is not None else 'batch entry'}), "
                    f"got shape {_fmt(x.shape)}"
                )
        scale = args.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"{self.name}: 'scale' must be a float or None, got {scale!r}")
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"{self.name}: 'scale' must be finite, got {scale!r}")
        ofs = args.get("output_final_state", False)
        if not isinstance(ofs, bool):
            raise TypeError(f"{self.name}: 'output_final_state' must be a bool, got {ofs!r}")
        if self.extra_check is not None:
            self.extra_check(dims, dict(args))
        return dims

    def check_values(self, args: Mapping[str, Any]) -> None:
        """Raise ValueError when an input holds values outside its declared bounds (a
        positive log gate, a forgetting rate above 1), naming the argument, the bounds and the
        worst value. NaN is not out of bounds (it propagates, as the math does). The references
        call this; the kernels do not: it reads the values back from the device."""
        for inp in self.inputs:
            x = args.get(inp.name)
            if inp.bounds is None or not isinstance(x, torch.Tensor) or x.numel() == 0:
                continue
            lo, hi = inp.bounds
            below, above = x < lo, x > hi
            if bool(below.any()) or bool(above.any()):
                worst = x[below].min().item() if bool(below.any()) else x[above].max().item()
                raise ValueError(f"{self.name}: '{inp.name}' must lie in [{lo:g}, {hi:g}], got "
                                 f"{worst!r}")

    def resolve_scale(self, scale: float | None, dims: Mapping[str, int]) -> float:
        """The scale a call uses: the given one, or ``K ** -0.5`` for ``None``."""
        if scale is not None:
            return float(scale)
        head_dim = dims.get("K", dims.get("D"))
        return head_dim**-0.5


def _fmt(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _bind_shape(op: str, inp: Input, x: torch.Tensor, dims: dict[str, int]) -> None:
    """Match x.shape against one of inp.shapes, binding size symbols into dims."""
    errors = []
    for shape in inp.shapes:
        bound = ", ".join(f"{s}={dims[s]}" for s in shape if isinstance(s, str) and s in dims)
        errors.append(_fmt(shape) + (f" with {bound}" if bound else ""))
        if x.dim() != len(shape):
            continue
        trial = dict(dims)
        ok = True
        for sym, size in zip(shape, x.shape):
            if isinstance(sym, int):
                ok = size == sym
            elif sym in trial:
                ok = trial[sym] == size
            else:
                trial[sym] = int(size)
            if not ok:
                break
        if ok:
            dims.update(trial)
            return
    raise ValueError(
        f"{op}: '{inp.name}' must have shape {' or '.join(errors)}; got {_fmt(x.shape)}"
    )


def _check_cu_seqlens(op: str, cu: Any, dims: dict[str, int], device: Any) -> int:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: 'cu_seqlens' must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: 'cu_seqlens' must be int64 (or int32), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{op}: 'cu_seqlens' must be 1-D with N+1 >= 2 offsets, got shape {_fmt(cu.shape)}"
        )
    if device is not None and cu.device != device:
        raise ValueError(f"{op}: 'cu_seqlens' is on {cu.device} but the inputs are on {device}")
    if dims.get("B", 1) != 1:
        raise ValueError(
            f"{op}: with cu_seqlens the batch size B must be 1 (sequences are packed along T), "
            f"got B={dims['B']}"
        )
    offsets = cu.tolist()
    T = dims.get("T")
    if offsets[0] != 0:
        raise ValueError(f"{op}: 'cu_seqlens' must start at 0, got {offsets[0]}")
    if T is not None and offsets[-1] != T:
        raise ValueError(f"{op}: 'cu_seqlens' must end at T={T}, got {offsets[-1]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(
                f"{op}: 'cu_seqlens' must be non-decreasing, got {offsets[i - 1]} then "
                f"{offsets[i]} at index {i}"
            )
    return len(offsets) - 1


def sequences(T: int, B: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """The (batch row, start, end) of every sequence in a call, empty ones included."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]
