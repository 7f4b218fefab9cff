"""The plugin registry: every implementation of the operators, by (operator, name).

The project's own implementations (references, kernels, adapted peers, baselines) are declared
in ``harness.impls``, one module per operator, and registered here on first use. A third-party
package registers its own through the entry-point group ``linattn_harness.plugins``: the entry
point names a callable (called with no arguments) or a module (imported), which calls
:func:`register`::

    [project.entry-points."linattn_harness.plugins"]
    mykernels = "mykernels.harness_plugin:register_all"

Without installing anything, :func:`load_plugin` imports one such module by name or file path
(``harness check --plugin``, ``harness bench --plugin``, which also hands it to every worker
process); a spec ``switch:OP/NAME:LABEL:module.NAME=VALUE,...`` registers implementation
NAME under that switch form as ``NAME[LABEL]`` (``harness check --set``, ``harness bench
--set``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from harness.implementation import DEVICES, DTYPES, KINDS, Implementation
from harness.switches import VARIANT, parse_set
from references.operators import OPERATORS

__all__ = ["Implementation", "register", "unregister", "load_plugins", "load_plugin",
           "plugin_errors", "implementations", "get", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "linattn_harness.plugins"

_REGISTRY: dict[tuple[str, str], Implementation] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_LOADED = False
_LOADED_SPECS: dict[str, str] = {}


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
            raise ValueError(f"register: dtypes must be among {tuple(DTYPES)}, got {d!r}")
    key = (impl.op, impl.name)
    if key in _REGISTRY and not replace:
        raise ValueError(f"register: {impl.key} is already registered (pass replace=True)")
    _REGISTRY[key] = impl
    return impl


def unregister(op: str, name: str) -> None:
    _REGISTRY.pop((op, name), None)


def load_plugins() -> None:
    """Register the project's implementations (``harness.impls.<op>.IMPLEMENTATIONS``, one
    module per operator) and every installed plugin (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for op in OPERATORS:
        for impl in importlib.import_module(f"harness.impls.{op}").IMPLEMENTATIONS:
            register(impl)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as exc:  # a broken plugin is reported, not fatal
            _PLUGIN_ERRORS[ep.name] = f"{ep.value}: {exc!r}"


def load_plugin(spec: str) -> None:
    """Import one plugin module and call its ``register_all`` (or the named function).

    ``spec`` is ``"package.module"``, ``"package.module:function"``, or a path to a ``.py``
    file (optionally ``"path.py:function"``). Loading the same spec twice does nothing the
    second time. Raises ValueError naming the spec when it cannot be imported or called.
    """
    load_plugins()
    if spec.startswith(VARIANT):  # an implementation under a switch form (harness.switches)
        if spec not in _LOADED_SPECS:
            try:
                _register_variant(spec[len(VARIANT):])
            except (KeyError, ValueError) as exc:
                raise ValueError(f"plugin {spec!r} failed to load: {exc}") from exc
            _LOADED_SPECS[spec] = spec
        return
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


def _register_variant(text: str) -> Implementation:
    """'OP/NAME:LABEL:module.NAME=VALUE,...': implementation NAME's entry as NAME[LABEL] with
    ``switch`` set (it runs under the form), no switches of its own; replaces an earlier one."""
    key, _, form_text = text.partition(":")
    op, _, name = key.partition("/")
    base, form = get(op, name), parse_set(form_text)
    what = ", ".join(f"{path}={value!r}" for path, value in form["set"].items())
    return register(dataclasses.replace(base, name=f"{base.name}[{form['what']}]", switch=form,
                                        switches=(), description=f"{base.description}; {what}"),
                    replace=True)


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
