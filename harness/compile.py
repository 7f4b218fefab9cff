"""Compile an operator's Triton kernels for a GPU, on a machine without one (`harness compile`).

Triton's interpreter runs a kernel's Python statement by statement; it does not type the
program the way the compiler does. A kernel can pass every interpreted test and fail to compile
on the GPU: the compiler also builds the statements after a ``return`` inside a constexpr
``if`` (where ``tl.dot`` of float32 and bfloat16 then fails to type), and the interpreter
cannot run bfloat16 at all. This closes that gap on the CPU:

1. *record* (a process with ``TRITON_INTERPRET=1``): run every Triton implementation of the
   operator forward and backward on small cases with the head sizes and options of the GPU
   suite, in float32, bfloat16 and float16 (the recorder runs no kernel, so bfloat16's own
   host code runs and picks bfloat16's modes), under its defaults and under each of its
   registered ``switches`` (module settings that take other kernel paths), and record each
   kernel launch: the kernel, its argument types, its constexprs and its launch options;
2. *build* (a process without the interpreter): compile each distinct launch as recorded for
   a CUDA target (sm_90 by default; Triton's bundled ptxas), in every tiling config its
   autotuner holds.

Nothing runs on a GPU, so a compiled kernel's *results* are not checked here (that is
``harness check`` on a GPU); what this catches is a kernel that would not compile there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.switches import parse_set, switched

# Cases are the GPU suite's explicit cases of the operator, shrunk for the interpreter: head
# sizes, options, states and varlen layouts decide the constexprs (H too, but not the code
# path); T and B are runtime values.
RECORD_T = 70  # one full chunk of 64 and a tail
RECORD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Launch:
    """One kernel launch as compiled: the kernel (module, name), every argument's type or
    constexpr value, and the launch options (num_warps, num_stages)."""

    module: str
    name: str
    args: dict[str, list]  # name -> ["ptr", torch dtype, aligned] | ["int", type, "one" | "div16" | ""]
    #                          | ["float", "fp32"] | ["bool", value] | ["const", value]
    options: dict[str, int]

    def key(self) -> str:
        return json.dumps([self.module, self.name, self.args, self.options], sort_keys=True)


# ------------------------------------------------------------------------------------ record
def _describe(value: Any) -> list:
    """A runtime argument as the JIT specializes it: pointers by dtype and 16-byte alignment,
    integers by width and whether they are 1 or divisible by 16 (not by value: T varies)."""
    import torch

    if isinstance(value, torch.Tensor):
        return ["ptr", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["bool", value]
    if value is None or isinstance(value, str):
        return ["const", value]
    if isinstance(value, int):
        kind = "one" if value == 1 else "div16" if value % 16 == 0 else ""
        return ["int", "i32" if -2**31 <= value < 2**31 else "i64", kind]
    if isinstance(value, float):
        return ["float", "fp32"]
    if hasattr(value, "value"):  # tl.constexpr
        return ["const", value.value]
    return ["const", repr(value)]


def constexprs(fn) -> set[str]:
    """The names of an interpreted kernel's tl.constexpr parameters."""
    import inspect

    return {p.name for p in inspect.signature(fn.fn).parameters.values()
            if "constexpr" in str(p.annotation)}


@contextlib.contextmanager
def _recording(launches: dict[str, Launch], execute: bool = False):
    """Within the block, patch the interpreter so that every launch is recorded, and run only
    with ``execute`` (the interpreter as it was after it: a recording process goes on running
    kernels).
    A launch's signature (argument dtypes, constexprs, options) is known before it runs and no
    host code of the kernels reads a kernel's results to pick the next launch, so recording
    without running sees the same launches in a fraction of the time (whether the kernels
    compute the right numbers is the tests' and `harness check`'s business)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
        named = dict(zip(self.arg_names, args))
        named.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        launch = Launch(self.fn.__module__, self.fn.__qualname__,
                        {k: ["const", getattr(v, "value", v)] if k in constexprs(self) else _describe(v)
                         for k, v in named.items()}, options)
        launches.setdefault(launch.key(), launch)
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def record_cases(op_name: str, ids: list[str] | None = None):
    """The GPU suite's explicit cases of ``op_name`` (those named in ``ids``, if given), shrunk
    to RECORD_T tokens, B = 1, H = 2 (and G <= 2)."""
    from dataclasses import replace

    from harness.gate.suites import load_suite

    suite = load_suite("gpu")
    cases, seen = [], set()
    for sc in suite.cases:
        if sc.op != op_name or sc.family != "random" or (ids and sc.id not in ids):
            continue
        case = sc.case
        dims = dict(case.dims, B=1, H=2)  # two heads: no head count folds to a constant 1
        if "G" in dims:  # q/k groups must divide the heads: two groups at most
            dims["G"] = min(dims["G"], 2)
        seqlens = None
        if case.seqlens is not None:  # keep the empty and one-token sequences, shorten the rest
            seqlens = [min(n, 40) for n in case.seqlens]
            dims["T"] = sum(seqlens)
        else:
            dims["T"] = min(dims["T"], RECORD_T)
        small = replace(case, dims=dims, seqlens=seqlens)
        if small.to_json() not in seen:
            seen.add(small.to_json())
            cases.append(small)
    return cases


def _run_once(impl, args, case, dtype) -> str | None:
    """One forward (and backward) of ``impl``; its error message or None."""
    import torch

    from harness.check.engine import run as run_impl

    douts = None
    if impl.backward:
        g = torch.Generator().manual_seed(0)
        out = run_impl(impl.load(), args, case, dtype, None, backward=False)
        douts = {n: torch.randn(o.shape, generator=g, dtype=torch.float64)
                 for n, o in (out.outputs or {}).items() if o is not None}
    return run_impl(impl.load(), args, case, dtype, douts).error


def record(op_name: str, impl_names: list[str] | None = None, case_ids: list[str] | None = None,
           on_event: Callable[[dict], None] | None = None, extra: tuple[dict, ...] = (),
           dtypes: tuple[str, ...] = RECORD_DTYPES,
           switch_dtypes: tuple[str, ...] | None = None) -> tuple[list[Launch], list[str]]:
    """Run the operator's Triton implementations under the interpreter with inputs of each of
    ``dtypes``; (launches, errors). Each runs under its defaults, and under its registered
    switches and the ``extra`` forms (harness.switches.parse_set's) with inputs of each of
    ``switch_dtypes`` (None: ``dtypes``). ``on_event`` hears of each implementation and switch
    recorded (launches so far, seconds)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record needs TRITON_INTERPRET=1 set before triton is imported")
    import torch

    from harness.cases import sample
    from harness.registry import implementations

    launches: dict[str, Launch] = {}
    impls = [i for i in implementations(op_name) if i.kind == "triton"
             and (not impl_names or i.name in impl_names) and i.why_unavailable("cpu") is None]
    if not impls:
        raise ValueError(f"{op_name} has no Triton implementation that runs here"
                         + (f" among {impl_names}" if impl_names else ""))
    cases = record_cases(op_name, case_ids)
    if case_ids and len(cases) != len(set(case_ids)):
        raise ValueError(f"cases: the gpu suite has no {op_name} case named in {case_ids}")
    with _recording(launches):
        errors = []
        start = time.perf_counter()
        for impl in impls:  # under its defaults, then under each of its switches (registry)
            for switches in ({},) + impl.switches + tuple(extra):
                with switched(switches):
                    for case in cases:
                        if impl.supports is not None and impl.supports(case) is not None:
                            continue
                        args = sample(case, "cpu")
                        for dtype in (dtypes if not switches or switch_dtypes is None
                                      else switch_dtypes):
                            error = _run_once(impl, args, case, getattr(torch, dtype))
                            if error:
                                errors.append(f"{impl.name} {dtype} {switches.get('what', '')} "
                                              f"{case.to_json()}: {error}")
                if on_event is not None:
                    on_event({"phase": "record", "impl": impl.name,
                              "what": switches.get("what", "defaults"), "launches": len(launches),
                              "seconds": round(time.perf_counter() - start, 1)})
    if not launches:
        raise ValueError(f"no kernel launch recorded for {op_name} on {len(cases)} case(s)")
    return list(launches.values()), errors


# ------------------------------------------------------------------------------------- build
def _kernel(launch: Launch):
    """The JITFunction of a launch, and the autotuner wrapping it (or None)."""
    import importlib

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(launch.module), launch.name)
    tuner = None
    while not isinstance(obj, JITFunction):
        if isinstance(obj, Autotuner):
            tuner = obj
        obj = obj.fn
    return obj, tuner


def variants(launch: Launch, all_configs: bool = False) -> list[tuple[str, Launch]]:
    """The launches to compile for one recorded launch, as (label, launch) pairs: its
    autotuner's first tiling config (the one the interpreter ran), or every config with
    ``all_configs``. Each label names the launch's input dtype (its half-precision pointers',
    else float32)."""
    _, tuner = _kernel(launch)
    configs = [None] if tuner is None else tuner.configs[:None if all_configs else 1]
    halves = {a[1] for a in launch.args.values() if a[:2] in (["ptr", "float16"],
                                                               ["ptr", "bfloat16"])}
    dtype = ",".join(sorted(halves)) or "float32"
    out = []
    for n, cfg in enumerate(configs):
        options = dict(launch.options)
        cargs = dict(launch.args)
        if cfg is not None:
            cargs.update({k: ["const", v] for k, v in cfg.kwargs.items()})
            options.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        consts = ", ".join(f"{k}={a[1]}" for k, a in cargs.items() if a[0] == "const")
        label = f"{launch.name}[{dtype}, config {n}, {options}] ({consts})"
        out.append((label, Launch(launch.module, launch.name, cargs, options)))
    return out


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def code_path(launch: Launch) -> str:
    """A launch without its sizes: the kernel, its pointer dtypes, its non-numeric constexprs
    (flags, modes: what picks the statements the compiler types) and its launch options.
    Launches on one path differ in head and tile sizes only."""
    args = {k: a[:2] for k, a in launch.args.items()
            if a[0] == "ptr" or (a[0] in ("const", "bool") and not _size(a[1]))}
    return json.dumps([launch.module, launch.name, args, launch.options], sort_keys=True)


def path_ends(launches: list[Launch]) -> list[tuple[Launch, Launch]]:
    """(smallest, largest) launch of each code path, by the product of its sizes, in the order
    the paths first appear: the largest uses the most shared memory (the limit a launch can
    break), the smallest compiles fastest through the code generator and ptxas."""
    ends: dict[str, list] = {}
    for launch in launches:
        size = math.prod(a[1] for a in launch.args.values()
                         if a[0] == "const" and _size(a[1]) and a[1] > 0)
        key = code_path(launch)
        if key not in ends:
            ends[key] = [(size, launch), (size, launch)]
        elif size < ends[key][0][0]:
            ends[key][0] = (size, launch)
        elif size > ends[key][1][0]:
            ends[key][1] = (size, launch)
    return [(small, large) for (_, small), (_, large) in ends.values()]


def per_path(launches: list[Launch]) -> list[Launch]:
    """One launch per code path: the one with the largest sizes (``path_ends``)."""
    return [large for _, large in path_ends(launches)]


# Shared memory a block may use (bytes): the opt-in maximum per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _argument(a: list) -> Any:
    """A stand-in value that the JIT specializes as the recorded argument was (CPU tensors: only
    their dtype and the alignment of their address matter)."""
    import torch

    kind = a[0]
    if kind == "ptr":
        x = torch.empty(32, dtype=getattr(torch, a[1]))
        return x if a[2] else x[1:]  # 16-byte aligned, or not
    if kind == "int":
        return {"one": 1, "div16": 16}.get(a[2], 17) + (2**32 if a[1] == "i64" else 0)
    if kind == "float":
        return 0.5
    return a[1]  # bool, const


def compile_kernel(launch: Launch, arch: int):
    """The launch compiled for CUDA sm_<arch> as the JIT would (its binder specializes the
    arguments: alignment and divisibility hints, constexprs): Triton's compiled kernel, with
    its PTX (``.asm["ptx"]``) and metadata. Raises what the compiler raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, _ = _kernel(launch)
    missing = [p.name for p in fn.params if p.name not in launch.args]
    if missing:
        raise ValueError(f"recorded launch has no value for {', '.join(missing)}")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_argument(launch.args[p.name]) for p in fn.params]
    kwargs = dict(launch.options, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


class _StoppedAfterLLIR(Exception):
    """A compile stopped after its LLVM IR, with the shared memory the launch needs."""

    def __init__(self, shared: int):
        super().__init__(shared)
        self.shared = shared


@contextlib.contextmanager
def _through_llir():
    """Within the block, compiles stop after the LLVM IR (``_StoppedAfterLLIR``): past the
    front end's typing and the shared-memory allocation, before LLVM's code generator and
    ptxas, most of a large launch's time (fused TTT backward, float32, 64 x 128: 42 of 211 s).
    A compile found in Triton's cache returns whole, as usual."""
    from triton import knobs

    def hook(backend, stages, options, language, capability):
        make_llir = stages["llir"]

        def llir(src, metadata):
            make_llir(src, metadata)
            raise _StoppedAfterLLIR(metadata["shared"])

        stages["llir"] = llir

    previous = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = hook
    try:
        yield
    finally:
        knobs.runtime.add_stages_inspection_hook = previous


def compile_launch(launch: Launch, arch: int, whole: bool = True) -> str | None:
    """Compile one launch (``compile_kernel``), to the end or, unless ``whole``, through its
    LLVM IR (``_through_llir``); None, or what went wrong: the compiler's error (its last
    lines) or more shared memory than a block may have."""
    try:
        with contextlib.nullcontext() if whole else _through_llir():
            shared = compile_kernel(launch, arch).metadata.shared
    except _StoppedAfterLLIR as stop:
        shared = stop.shared
    except Exception as exc:  # the compiler's message ends with the offending source line
        text = "\n".join(str(exc).strip().splitlines()[-12:])
        return text or repr(exc)
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and shared > limit:
        return (f"needs {shared} bytes of shared memory; sm_{arch} allows {limit} "
                f"(the launch would fail with OutOfResources)")
    return None


def _build_one(item: tuple[str, dict, int, bool]) -> tuple[str, str | None, float]:
    label, fields, arch, whole = item
    start = time.perf_counter()
    return label, compile_launch(Launch(**fields), arch, whole), time.perf_counter() - start


THROUGH_LLIR = " through LLVM IR"  # the label's end of a compile that stops there


def build_items(launches: list[Launch], arch: int = 90, all_configs: bool = False,
                whole: bool = True) -> list[tuple[str, dict, int, bool]]:
    """(label, launch fields, arch, whole) of every variant of every launch to compile, each
    to the end or (not ``whole``) through its LLVM IR."""
    from dataclasses import asdict

    return [(label + ("" if whole else THROUGH_LLIR), asdict(v), arch, whole)
            for launch in launches for label, v in variants(launch, all_configs)]


def path_items(launches: list[Launch], arch: int = 90, all_configs: bool = False
               ) -> tuple[list[tuple[str, dict, int, bool]], int]:
    """The compiles of each code path (``path_ends``): its smallest launch whole and its
    largest, if another, through its LLVM IR (for the shared memory it needs); and how many
    launches that is. On 2 cores, 2026-12-07, the compile test's TTT compiles took 109 s this
    way and 338 s with each path's largest launch compiled whole (docs/testing.md)."""
    ends = path_ends(launches)
    larger = [large for small, large in ends if large.key() != small.key()]
    return (build_items([small for small, _ in ends], arch, all_configs)
            + build_items(larger, arch, all_configs, whole=False), len(ends) + len(larger))


def build(items: list[tuple[str, dict, int, bool]], jobs: int = 1):
    """Compile ``build_items``; yields (label, error or None, seconds) as each finishes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("build needs a process without TRITON_INTERPRET=1")
    if jobs <= 1:
        yield from map(_build_one, items)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(_build_one, item) for item in items]):
            yield future.result()


# ------------------------------------------------------------------------- both, in processes
def compile_op(op_name: str, impls: list[str] | None = None, arch: int = 90, jobs: int = 1,
               all_configs: bool = False, cases: list[str] | None = None,
               workdir: Path | None = None, dtypes: tuple[str, ...] = RECORD_DTYPES,
               on_event: Callable[[dict], None] | None = None,
               each_path: bool = False,
               switch_dtypes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Record (interpreter) and build (compiler) in two child processes, whatever this
    process's TRITON_INTERPRET; returns {"launches", "compiled": [(label, error, s)], "errors"}.
    ``on_event`` hears each step as it happens (the children write one JSON line per event):
    {"phase": "record", ...} per implementation and switch, {"phase": "build-start", "total",
    "jobs"}, then {"phase": "build", "label", "error", "seconds"} per compile. ``each_path``
    compiles two launches per code path (``path_items``) instead of every recorded launch;
    ``dtypes``: the inputs' dtypes the implementations are recorded with, ``switch_dtypes``
    those of their registered switches (None: ``dtypes``)."""
    import tempfile

    workdir = Path(workdir or tempfile.mkdtemp(prefix="linattn-compile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    recorded, built = workdir / "launches.json", workdir / "compiled.json"
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    common = ["--op", op_name, "--arch", str(arch), "--jobs", str(jobs),
              "--impls", ",".join(impls or []), "--cases", ",".join(cases or [])]
    common += ["--dtypes", ",".join(dtypes)] + (["--all-configs"] if all_configs else [])
    common += ["--switch-dtypes", ",".join(switch_dtypes)] if switch_dtypes else []
    common += ["--each-path"] if each_path else []
    for phase, env, out in (("record", dict(base, TRITON_INTERPRET="1"), recorded),
                            ("build", base, built)):
        log = workdir / f"{phase}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "harness.compile", phase, str(workdir),
                                     *common], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            for line in proc.stdout:
                if on_event is not None and line.startswith("{"):
                    on_event(json.loads(line))
            proc.wait()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"harness.compile {phase} failed:\n{log.read_text()[-4000:]}")
    data = json.loads(recorded.read_text())
    data["compiled"] = json.loads(built.read_text())
    return data


def _main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m harness.compile")
    ap.add_argument("phase", choices=("record", "build"))
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--op", required=True)
    ap.add_argument("--impls", default="")
    ap.add_argument("--cases", default="")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--all-configs", action="store_true")
    ap.add_argument("--dtypes", default=",".join(RECORD_DTYPES))
    ap.add_argument("--switch-dtypes", default="")
    ap.add_argument("--each-path", action="store_true")
    ap.add_argument("--set", action="append", default=[], dest="sets",
                    help="record under this form too: 'LABEL:module.NAME=VALUE,...'")
    a = ap.parse_args(argv)
    events = os.fdopen(os.dup(1), "w", buffering=1)  # the parent reads events from stdout;
    os.dup2(2, 1)  # whatever else is printed (by kernels, libraries) goes to the log

    def emit(event: dict) -> None:
        events.write(json.dumps(event) + "\n")

    names = [n for n in a.impls.split(",") if n]
    if a.phase == "record":
        launches, errors = record(a.op, names, [c for c in a.cases.split(",") if c], emit,
                                  tuple(parse_set(text) for text in a.sets),
                                  tuple(d for d in a.dtypes.split(",") if d),
                                  tuple(d for d in a.switch_dtypes.split(",") if d) or None)
        (a.workdir / "launches.json").write_text(json.dumps(
            {"launches": [vars(x) for x in launches], "errors": errors}))
        return
    data = json.loads((a.workdir / "launches.json").read_text())
    launches = [Launch(**x) for x in data["launches"]]
    if a.each_path:
        items, chosen = path_items(launches, a.arch, a.all_configs)
    else:
        items, chosen = build_items(launches, a.arch, a.all_configs), len(launches)
    emit({"phase": "build-start", "total": len(items), "jobs": a.jobs, "launches": len(launches),
          "chosen": chosen})
    results = []
    for label, error, seconds in build(items, a.jobs):
        results.append((label, error, seconds))
        emit({"phase": "build", "label": label, "error": error, "seconds": round(seconds, 2)})
    (a.workdir / "compiled.json").write_text(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1:])
