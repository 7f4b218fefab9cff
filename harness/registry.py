"""The plugin registry: implementations of the operators, by (operator, name).

An :class:`Implementation` is one way of computing an operator: a reference, one of our Triton
kernels, or a peer library adapted to our API. It is called with the operator's canonical
arguments (the reference's keyword names, see ``harness/operators.py``) and returns the
operator's output tuple.

Built-ins register from ``harness.builtin``. A third-party package registers its own through
the entry-point group ``linattn_harness.plugins``: the entry point names a callable (called
with no arguments) or a module (imported), which calls :func:`register`::

    [project.entry-points."linattn_harness.plugins"]
    mykernels = "mykernels.harness_plugin:register_all"

Without installing anything, :func:`load_plugin` imports one such module by name or file path
(``harness bench --plugin``, which also hands it to every worker process).

Kinds: ``reference`` (ours, pure PyTorch), ``triton`` (our kernels), ``peer`` (another
library computing the same operator) and ``baseline``: something users compare speed with
that computes *different* math (softmax attention), so ``harness bench`` times it and
``harness check`` leaves it out.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

from harness.operators import OPERATORS

ENTRY_POINT_GROUP = "linattn_harness.plugins"
KINDS = ("reference", "triton", "peer", "baseline")
DTYPES = ("float64", "float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
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
    dtypes: tuple[str, ...] = DTYPES
    description: str = ""
    backward: bool = True  # gradients are checked too
    available: Callable[[], str | None] | None = None
    supports: Callable[[Any], str | None] | None = None
    # Module switches whose other values take other kernel paths (constexprs the host picks):
    # ({"what": ..., "set": {"module.NAME": value}}, ...). `harness compile` records the
    # kernel's launches under each as well as under the defaults.
    switches: tuple[dict[str, Any], ...] = ()
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
        """The Triton interpreter runs ~3 ms per program per loop step: long cases would take
        minutes, so interpreted kernels stop at INTERPRETER_MAX_T tokens."""
        if self.kind == "triton" and device == "cpu" and case.dims["T"] > INTERPRETER_MAX_T:
            return f"T > {INTERPRETER_MAX_T} under the Triton interpreter"
        return None

    def __call__(self, **kwargs: Any) -> Any:
        return self.load()(**kwargs)


_REGISTRY: dict[tuple[str, str], Implementation] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_LOADED = False


def register(impl: Implementation, *, replace: bool = False) -> Implementation:
    """Add an implementation. Raises ValueError on an unknown operator, kind, device or dtype,
    or on a name already taken (unless ``replace``)."""
    if impl.op not in OPERATORS:
        raise ValueError(f"register: unknown operator {impl.op!r}; known: {', '.join(OPERATORS)}")
    if impl.kind not in KINDS:
        raise ValueError(f"register: kind must be one of {KINDS}, got {impl.kind!r}")
    for d in impl.devices:
        if d not in DEVICES:
            raise ValueError(f"register: devices must be among {DEVICES}, got {d!r}")
    for d in impl.dtypes:
        if d not in DTYPES:
            raise ValueError(f"register: dtypes must be among {DTYPES}, got {d!r}")
    key = (impl.op, impl.name)
    if key in _REGISTRY and not replace:
        raise ValueError(f"register: {impl.key} is already registered (pass replace=True)")
    _REGISTRY[key] = impl
    return impl


def unregister(op: str, name: str) -> None:
    _REGISTRY.pop((op, name), None)


def load_plugins() -> None:
    """Register the built-ins and every installed plugin (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    importlib.import_module("harness.builtin")
    importlib.import_module("harness.peers")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as exc:  # a broken plugin is reported, not fatal
            _PLUGIN_ERRORS[ep.name] = f"{ep.value}: {exc!r}"


_LOADED_SPECS: dict[str, str] = {}


def load_plugin(spec: str) -> None:
    """Import one plugin module and call its ``register_all`` (or the named function).

    ``spec`` is ``"package.module"``, ``"package.module:function"``, or a path to a ``.py``
    file (optionally ``"path.py:function"``). Loading the same spec twice does nothing the
    second time. Raises ValueError naming the spec when it cannot be imported or called.
    """
    load_plugins()
    if ":" in spec and not spec.endswith(".py"):
        target, attr = spec.rsplit(":", 1)
    else:
        target, attr = spec, ""
    if target.endswith(".py"):
        target = str(Path(target).resolve())
    if target in _LOADED_SPECS:
        return
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            name = f"_harness_plugin_{len(_LOADED_SPECS)}_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, attr or "register_all", None)
        if attr and fn is None:
            raise AttributeError(f"{target} has no function {attr!r}")
        if callable(fn):
            fn()
    except Exception as exc:
        raise ValueError(f"plugin {spec!r} failed to load: {exc!r}") from exc
    _LOADED_SPECS[target] = spec


def plugin_errors() -> dict[str, str]:
    load_plugins()
    return dict(_PLUGIN_ERRORS)


def implementations(op: str | None = None) -> list[Implementation]:
    load_plugins()
    return [impl for (o, _), impl in _REGISTRY.items() if op is None or o == op]


def get(op: str, name: str) -> Implementation:
    load_plugins()
    if op not in OPERATORS:
        raise KeyError(f"unknown operator {op!r}; known: {', '.join(OPERATORS)}")
    try:
        return _REGISTRY[(op, name)]
    except KeyError:
        known = ", ".join(n for (o, n) in _REGISTRY if o == op)
        raise KeyError(f"unknown implementation {name!r} of {op}; known: {known}") from None
