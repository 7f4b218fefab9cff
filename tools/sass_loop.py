"""The instruction mix of a kernel's hottest loop, from its PTX, without a GPU.

    python tools/sass_loop.py PTX... [--arch 90] [--lines N]

Each PTX file (``python tools/kernel_registers.py OP --ptx DIR`` writes one per kernel and code
path) is assembled by Triton's bundled ptxas and disassembled by its nvdisasm; the widest
backward branch of the SASS is taken as the kernel's main loop (a walk's loop over the
mini-batches), and its instructions are counted by class: barriers, shared-memory loads and
stores, warp shuffles, tensor-core products (mma.sync's HMMA, wgmma's HGMMA), global loads and
stores, float32 arithmetic. A walk that runs one program per (sequence, head) has one warp per
scheduler: nothing hides a stall, so a mini-batch costs about its chain of dependent
instructions, and a barrier or a shared-memory round trip in it is a stall every warp waits out.
With ``--lines N`` (PTX that kept its source lines: ``kernel_registers.py --ptx-lines``) the N
source lines that put the most instructions in the loop follow, each with its commonest
opcodes: which stage of the kernel the instructions come from. The counts are the compiler's,
not a timing; what they motivate is timed on the GPU.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=160)
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+|0x[0-9a-f]+)")
SOURCE = re.compile(r'//## File "(.*?)", line (\d+)')
# column -> the SASS opcodes it counts: barriers, shared-memory loads and stores, warp
# shuffles, tensor-core products (mma.sync, wgmma), global loads and stores, float32 arithmetic,
# conversions
CLASSES = {
    "BAR": ("BAR",),
    "LDS": ("LDS", "LDSM"),
    "STS": ("STS", "STSM"),
    "SHFL": ("SHFL",),
    "HMMA": ("HMMA",),
    "HGMMA": ("HGMMA",),
    "LDG": ("LDG",),
    "STG": ("STG",),
    "F32": ("FADD", "FMUL", "FFMA", "FMNMX"),
    "CVT": ("F2F", "F2FP", "I2F", "F2I"),
}


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of each SASS line, branch targets given as addresses."""
    found, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = INSTRUCTION.match(line)
        if m:
            address = int(m.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            found.append((address, m.group(2)))
    out = []
    for address, text in found:
        branch = BRANCH.search(text)
        if branch and branch.group(1).startswith(".L"):
            text = text.replace(branch.group(1), hex(labels.get(branch.group(1), address)))
        out.append((address, text))
    return out


def loop_bounds(code: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) address of the widest backward branch's loop, None without one."""
    widest = None
    for address, text in code:
        branch = BRANCH.search(text)
        if branch and branch.group(1).startswith("0x"):
            target = int(branch.group(1), 16)
            if target < address and (widest is None or address - target > widest[1] - widest[0]):
                widest = (target, address)
    return widest


def main_loop(sass: str) -> list[str]:
    """The instructions between the target of the widest backward branch and that branch."""
    code = instructions(sass)
    widest = loop_bounds(code)
    if widest is None:
        return []
    return [text for address, text in code if widest[0] <= address <= widest[1]]


def loop_lines(sass: str) -> dict[tuple[str, int] | None, Counter]:
    """(file, line) -> the opcodes of the loop's instructions from that source line (nvdisasm
    -g's line comments; an instruction counts for the last line named before it, None before
    any)."""
    widest = loop_bounds(instructions(sass))
    where, out = None, {}
    for line in sass.splitlines():
        source = SOURCE.search(line)
        if source:
            where = (source.group(1), int(source.group(2)))
            continue
        m = INSTRUCTION.match(line)
        if m and widest and widest[0] <= int(m.group(1), 16) <= widest[1]:
            out.setdefault(where, Counter())[opcode(m.group(2)).split(".")[0]] += 1
    return out


def opcode(text: str) -> str:
    """An instruction's opcode, its predicate (@P0, @!P1) left out."""
    words = text.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def mix(loop: list[str]) -> dict[str, int]:
    """The loop's length and its count of each of CLASSES."""
    ops = Counter(opcode(t).split(".")[0] for t in loop)
    counts = {"instructions": len(loop)}
    for column, prefixes in CLASSES.items():
        counts[column] = sum(n for op, n in ops.items() if op in prefixes)
    return counts


def disassemble(ptx: Path, arch: int, workdir: Path) -> str:
    """SASS of a PTX file, through the ptxas and nvdisasm Triton bundles."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = workdir / (ptx.stem + ".cubin")
    suffix = "a" if arch >= 90 else ""
    subprocess.run([str(bin_dir / "ptxas"), f"-arch=sm_{arch}{suffix}", "-lineinfo", str(ptx),
                    "-o", str(cubin)], check=True, capture_output=True, text=True)
    return subprocess.run([str(bin_dir / "nvdisasm"), "-g", "-c", str(cubin)], check=True,
                          capture_output=True, text=True).stdout


def print_lines(name: str, lines: dict, n: int) -> None:
    """The n source lines with the most loop instructions, with their commonest opcodes."""
    table = Table(title=f"{name}: the loop's instructions by source line", title_justify="left")
    for column in ("instructions", "source line", "code", "commonest opcodes"):
        table.add_column(column, justify="right" if column == "instructions" else "left")
    ranked = sorted(lines.items(), key=lambda kv: -sum(kv[1].values()))[:n]
    for where, ops in ranked:
        code = ""
        if where is not None and Path(where[0]).is_file():
            code = Path(where[0]).read_text().splitlines()[where[1] - 1].strip()[:60]
        place = "?" if where is None else f"{Path(where[0]).name}:{where[1]}"
        table.add_row(str(sum(ops.values())), place, code,
                      " ".join(f"{op} {k}" for op, k in ops.most_common(4)))
    console.print(table)


def main(ptx: list[Path] = typer.Argument(..., help="PTX files (kernel_registers.py --ptx)"),
         arch: int = typer.Option(90, help="CUDA compute capability x 10"),
         lines: int = typer.Option(0, help="also the N source lines with the most loop "
                                           "instructions (PTX from --ptx-lines)")) -> None:
    table = Table(title=f"main loop per iteration, sm_{arch}", title_justify="left")
    table.add_column("kernel (PTX file)", justify="left")
    columns = ["instructions", *CLASSES]
    table.columns[0].no_wrap = True
    for column in columns:
        table.add_column(column, justify="right")
    by_line = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ptx:
            sass = disassemble(path, arch, Path(tmp))
            counts = mix(main_loop(sass))
            table.add_row(path.name, *(str(counts[c]) for c in columns))
            by_line[path.name] = loop_lines(sass)
    console.print(table)
    for name, found in by_line.items():
        if lines:
            print_lines(name, found, lines)


if __name__ == "__main__":
    typer.run(main)
