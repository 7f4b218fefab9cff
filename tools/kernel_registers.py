"""Registers and spills of an operator's kernels on sm_90, measured without a GPU.

    python tools/kernel_registers.py OP [--case basic] [--impl chunk] [--kernel NAME]
        [--half bfloat16] [--arch 90] [--ptx DIR] [--set 'LABEL:module.NAME=VALUE,...' ...]

Records the launches of the gpu suite's case (``harness.compile``'s record phase, through the
interpreter), compiles one launch per kernel and code path as the JIT would
(``harness.compile.compile_kernel``), and runs Triton's bundled ptxas with ``-v`` on each PTX:
registers per thread, spill stores and loads (bytes per thread), shared memory. A kernel that
spills moves its tiles through local memory in its hot loop: the first thing to look at when a
stage is slower than its arithmetic and traffic say. The numbers are the compiler's, not a
timing; a change they motivate is still timed on the GPU (reports/<op>.md). ``--ptx DIR``
keeps each kernel's PTX without its debug information: two runs' folders diff to nothing when a change leaves an operator's
compiled code as it was (a shared stage gaining a switch another operator uses, say);
``--ptx-lines`` keeps the source lines, for ``python tools/sass_loop.py --lines``.
``--set`` also records the launches under a form no registration lists (a switch's value not yet
timed), as tools/switch_compare.py and tools/kernel_profile.py take it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=220)
SIZES = ("K", "V", "D", "BT", "BC", "BK", "BKA", "BV", "DBK")
# the product modes (Titans' walks) and the stored states' forms, where given
MODES = ("PRECISION", "MIXED", "UMIXED", "DK_PRECISION", "SCALED", "STATES_SCALED")
REGS = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _record(op: str, case: str, impl: str, half: str, workdir: Path, sets: list[str]
            ) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-m", "harness.compile", "record", str(workdir), "--op", op,
                    "--impls", impl, "--cases", case, f"--dtypes=float32,{half}",
                    *(f"--set={text}" for text in sets)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((workdir / "launches.json").read_text())["launches"]


def code_only(ptx: str) -> str:
    """PTX without its debug information (source lines and columns, DWARF sections), which
    moves with every edit of a source file; what is left is the compiled code."""
    code = ptx.split("\t.section\t.debug", 1)[0]
    return "\n".join(line for line in code.splitlines()
                     if not line.lstrip().startswith((".loc", ".file", "$L__tmp", "$L__func"))) + "\n"


def _ptxas(ptx: str, arch: int, workdir: Path) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    src = workdir / "kernel.ptx"
    src.write_text(ptx)
    suffix = "a" if arch >= 90 else ""
    out = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o",
                          str(workdir / "kernel.cubin")], capture_output=True, text=True)
    regs, spills = REGS.search(out.stderr), SPILLS.search(out.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas said nothing usable:\n{out.stderr[-2000:]}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def main(op: str = typer.Argument(..., help="operator (see `harness list`)"),
         case: str = typer.Option("basic", help="the gpu suite's case whose launches to compile"),
         impl: str = typer.Option("", help="implementations, comma-separated (default: all)"),
         kernel: str = typer.Option("", help="only kernels whose name contains this"),
         half: str = typer.Option("bfloat16", help="the dtype a half-precision launch runs in"),
         arch: int = typer.Option(90, help="CUDA compute capability x 10"),
         ptx: Path = typer.Option(None, help="also write each compiled kernel's PTX here, one "
                                             "file per row (to diff a change's compiled code)"),
         ptx_lines: bool = typer.Option(False, help="keep the source lines in the PTX written "
                                                    "(for tools/sass_loop.py --lines)"),
         sets: list[str] = typer.Option([], "--set", help="also under 'LABEL:module.NAME=VALUE,...'")
         ) -> None:
    """Registers, spills and shared memory per kernel and code path."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise typer.BadParameter("run without TRITON_INTERPRET=1 (the compiler runs here)")
    from harness.compile import Launch, compile_kernel, per_path, variants
    from harness.switches import parse_set_option

    parse_set_option(sets)  # a bad --set is a usage error before the record subprocess runs

    workdir = Path(tempfile.mkdtemp(prefix="linattn-registers-"))
    launches = [Launch(**x) for x in _record(op, case, impl, half, workdir, sets)]
    table = Table(title=f"{op} {case}: sm_{arch}, {half}")
    for col in ("kernel (code path)", "warps", "stages", "registers", "spill stores",
                "spill loads", "shared"):
        table.add_column(col, justify="left" if col.startswith("kernel") else "right")
    if ptx is not None:
        ptx.mkdir(parents=True, exist_ok=True)
    row = 0
    for launch in per_path(launches):
        if kernel not in launch.name:
            continue
        for _, variant in variants(launch):
            compiled = compile_kernel(variant, arch)
            row += 1
            if ptx is not None:
                code = compiled.asm["ptx"]
                (ptx / f"{row:02d}-{launch.name}.ptx").write_text(code if ptx_lines
                                                                  else code_only(code))
            regs, st, ld = _ptxas(compiled.asm["ptx"], arch, workdir)
            meta = compiled.metadata
            consts = ", ".join(f"{k}={a[1]}" for k, a in variant.args.items()
                               if a[0] == "const" and (k in SIZES or k in MODES) and a[1] != "")
            table.add_row(f"{launch.name} ({consts})", str(meta.num_warps), str(meta.num_stages), str(regs), str(st),
                          str(ld), str(meta.shared),
                          style="red" if st or ld else None)
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
