"""What an implementation of an operator is, to the harness.

An :class:`Implementation` is one way of computing an operator: a reference, one of our Triton
kernels, or a peer library adapted to our API. It is called with the operator's canonical
arguments (the reference's keyword names, ``references/operators.py``) and returns the
operator's output tuple. ``harness.impls`` declares the project's own; ``harness.registry``
holds them all, plugins' included.

Kinds: ``reference`` (ours, pure PyTorch), ``triton`` (our kernels), ``peer`` (another
library computing the same operator) and ``baseline``: something users compare speed with
that computes *different* math (softmax attention), so ``harness bench`` times it and
``harness check`` leaves it out.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness.switches import switched

KINDS = ("reference", "triton", "peer", "baseline")
# Every dtype the harness runs, by name.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEVICES = ("cpu", "cuda")
# The Triton interpreter runs ~3 ms per program per loop step: longer cases would take minutes.
INTERPRETER_MAX_T = 512


@dataclass
class Implementation:
    """One implementation of one operator.

    ``target`` is the function (or "module:function", imported on first use) taking the
    operator's canonical keyword arguments. ``available()`` returns None when it can run here,
    else the reason it cannot; ``supports(case)`` likewise for one generated case (a kernel
    without a feature declines the cases that use it).
    """

    op: str
    name: str
    kind: str
    target: Callable[..., Any] | str
    devices: tuple[str, ...] = DEVICES
    dtypes: tuple[str, ...] = tuple(DTYPES)
    description: str = ""
    backward: bool = True  # gradients are checked too
    # Its forward takes another path when no input needs a gradient (inference): the check runs
    # that forward too, and each output's error is the worse of the two forwards' (with
    # backward False the check's one forward is already that one); the causality family runs
    # both forwards.
    inference_path: bool = False
    available: Callable[[], str | None] | None = None
    supports: Callable[[Any], str | None] | None = None
    # Module switches whose other values take other kernel paths (constexprs the host picks):
    # ({"what": ..., "set": {"module.NAME": value}}, ...). `harness compile` records the
    # kernel's launches under each as well as under the defaults.
    switches: tuple[dict[str, Any], ...] = ()
    # The switch form it runs under, forward and backward: another implementation with module
    # constants set (harness.switches.variant; `harness check --set`), or None.
    switch: dict[str, Any] | None = None
    _fn: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"

    @property
    def checkable(self) -> bool:
        """Whether it computes the operator's math (a baseline computes something else)."""
        return self.kind != "baseline"

    def load(self) -> Callable[..., Any]:
        if self._fn is None:
            if callable(self.target):
                self._fn = self.target
            else:
                module, _, attr = self.target.partition(":")
                self._fn = getattr(importlib.import_module(module), attr)
        return self._fn

    def why_unavailable(self, device: str | None = None) -> str | None:
        if device is not None and device not in self.devices:
            return f"runs on {', '.join(self.devices)}, not {device}"
        if self.available is not None:
            try:
                reason = self.available()
            except Exception as exc:  # an availability probe must not take the CLI down
                reason = f"availability check failed: {exc!r}"
            if reason:
                return reason
        try:
            self.load()
        except Exception as exc:
            return f"cannot import {self.target}: {exc}"
        return None

    def dtype_unsupported(self, dtype: str, device: str) -> str | None:
        """Why this implementation cannot run ``dtype`` on ``device`` (None when it can)."""
        if dtype not in self.dtypes:
            return f"takes {', '.join(self.dtypes)}"
        if self.kind == "triton" and device == "cpu" and dtype == "bfloat16":
            return "the Triton interpreter has no bfloat16"
        return None

    def too_slow(self, case: Any, device: str) -> str | None:
        """Interpreted kernels stop at INTERPRETER_MAX_T tokens (minutes past it)."""
        if self.kind == "triton" and device == "cpu" and case.dims["T"] > INTERPRETER_MAX_T:
            return f"T > {INTERPRETER_MAX_T} under the Triton interpreter"
        return None

    def switched(self):
        """A ``with`` block under this implementation's switch form (none: nothing set); the
        callers hold it through a call's forward and backward."""
        return switched(self.switch or {})

    def __call__(self, **kwargs: Any) -> Any:
        return self.load()(**kwargs)
