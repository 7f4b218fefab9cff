"""What every command of the ``harness`` CLI shares: the console, the usage-error exit, comma
lists, and the process settings a command makes before any implementation is loaded (the
device, pinned tiling configs, where the references run)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer
from rich.console import Console

# a terminal gets its own width; a log file gets lines long enough for a reproduce command
console = Console(width=None if sys.stdout.isatty() else 150)

DEVICE_HELP = "auto: cuda when available, else cpu (Triton kernels run through its interpreter)."
AUTOTUNE_HELP = ("time every tiling config of each kernel and keep the fastest (as bench does); by "
                 "default numerical runs compile each kernel's first config alone: reproducible (the "
                 "autotuner's pick varies run to run, and configs differ in summation order, a few "
                 "ulps), and one compile per shape is minutes less on a GPU")
REF_DEVICE_HELP = ("where the float64 truth and the same-dtype references run: auto (the CPU when "
                   "the implementations run on a GPU, where the references' step loops are "
                   "launch-bound and their autograd graphs would take GPU memory), cpu, or device "
                   "(with the implementations)")


def fail(message: str) -> NoReturn:
    """A usage error: printed, exit status 2."""
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


def split(values: list[str]) -> list[str]:
    """Repeated and comma-separated option values, as one list."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def select_device(device: str) -> str:
    """Resolve auto/cpu/cuda. On the CPU, Triton kernels need TRITON_INTERPRET=1 before triton
    is imported, so it is set here, before any implementation is loaded."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"expected auto, cpu or cuda, got {device!r}", param_hint="--device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("cuda requested but torch sees no CUDA device", param_hint="--device")
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            console.print("[yellow]triton was imported before TRITON_INTERPRET=1 could be set; "
                          "kernels may not run on the CPU[/]")
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def set_ref_device(choice: str) -> None:
    """Record --ref-device for the check engine (and gate workers, which inherit the
    environment)."""
    from harness.check.engine import REF_DEVICE_ENV, REF_DEVICES

    if choice not in REF_DEVICES:
        raise typer.BadParameter(f"expected one of {', '.join(REF_DEVICES)}, got {choice!r}",
                                 param_hint="--ref-device")
    os.environ[REF_DEVICE_ENV] = choice


def pin_configs(autotune: bool) -> None:
    """LINATTN_AUTOTUNE=0 unless asked to autotune; kernels read it when first imported."""
    if not autotune:
        os.environ["LINATTN_AUTOTUNE"] = "0"


def known_op(op: str) -> str:
    """``op`` if it names an operator, else a usage error listing them."""
    from references.operators import OPERATORS

    if op not in OPERATORS:
        fail(f"unknown operator {op!r}; known: {', '.join(OPERATORS)}")
    return op


SET_HELP = ("also run each chosen Triton implementation NAME under a switch form "
            "'LABEL:module.NAME=VALUE,...', as NAME[LABEL] (repeatable)")


def with_variants(chosen: list, sets: list[str]) -> tuple[list, list[str]]:
    """The chosen implementations and, after each Triton one, its variant under each switch
    form of ``--set``, registered here; and the plugin specs that register them in every
    worker (harness.registry.load_plugin)."""
    from harness.registry import get, load_plugin
    from harness.switches import parse_set_option, variant_spec

    forms = parse_set_option(sets)
    out, specs = [], []
    for i in chosen:
        out.append(i)
        for text, form in zip(sets, forms) if i.kind == "triton" else ():
            specs.append(variant_spec(i.key, text))
            load_plugin(specs[-1])
            out.append(get(i.op, f"{i.name}[{form['what']}]"))
    return out, specs
