"""Kernel switches: module constants the kernels read when they launch (an implementation's
registered ``switches``, or a ``LABEL:module.NAME=VALUE,...`` given on a command line), set for
the length of a ``with`` block; and the plugin spec of an implementation's variant under such
a form (harness.registry.load_plugin registers it as ``name[LABEL]``, here and in every
worker)."""

from __future__ import annotations

import ast
import contextlib
import re
from typing import Any, Iterator
from unittest.mock import patch

__all__ = ["parse_set", "parse_set_option", "switched", "variant_spec", "VARIANT"]

# A plugin spec (harness.registry.load_plugin) of this prefix registers a variant:
# "switch:OP/NAME:LABEL:module.NAME=VALUE,...".
VARIANT = "switch:"


def parse_set(text: str) -> dict[str, Any]:
    """'LABEL:module.NAME=VALUE,module.NAME=VALUE' -> {"what": LABEL, "set": {path: value}}."""
    label, _, assignments = text.partition(":")
    if not assignments:
        raise ValueError(f"expected 'LABEL:module.NAME=VALUE,...', got {text!r}")
    values = {}
    # A comma starts the next assignment only where "module.NAME=" follows it, so that a value
    # may be a dict or tuple: "REPLAY={'bfloat16': 8, 'float16': 8}".
    for item in re.split(r",(?=\s*[\w.]+\s*=)", assignments):
        path, _, value = item.partition("=")
        try:
            values[path.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{value.strip()!r} in {text!r} is not a Python literal") from None
    return {"what": label, "set": values}


def parse_set_option(texts: list[str]) -> list[dict[str, Any]]:
    """The forms of a command line's repeated ``--set``; a typer usage error naming the bad one."""
    import typer

    try:
        return [parse_set(text) for text in texts]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--set") from None


@contextlib.contextmanager
def switched(switch: dict[str, Any]) -> Iterator[None]:
    """Every ``module.NAME`` of ``switch["set"]`` at its value inside the block, restored after."""
    with contextlib.ExitStack() as stack:
        for path, value in switch.get("set", {}).items():
            stack.enter_context(patch(path, value))
        yield


def variant_spec(key: str, text: str) -> str:
    """The plugin spec that registers implementation ``key`` ("op/name") under the form
    ``text`` ('LABEL:module.NAME=VALUE,...') as "name[LABEL]"; a bad form raises ValueError."""
    parse_set(text)
    return f"{VARIANT}{key}:{text}"
