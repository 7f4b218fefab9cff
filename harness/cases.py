"""Test cases: what hypothesis draws, and the inputs a case turns into.

A :class:`Case` is plain data (JSON round-trips it, so a failing case can be replayed from
the command line). ``case_strategy`` draws cases for an operator; ``long_cases`` lists the
long-sequence family and ``tiling_cases`` the head-dim tiling classes; ``sample`` turns a case
into float64 input tensors from the case's seed and ``cast_args`` rounds them to a dtype.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from references.operators import OPERATORS, levels_needed
from references.spec import Operator

# Sizes the random family draws from, per device profile. The CPU profile keeps kernels
# cheap under the Triton interpreter (T <= 128, few programs); both include T = 1, lengths
# around and not multiples of every chunk size (16, 64), and head dims that are not powers
# of two. On a GPU every distinct head dim is a compile of every kernel (head dims are
# constexprs), and compiling is where a cold check's time goes: four head dims, two of them
# one 64-wide tile and its masked narrower kin, one tile pair (128), one not a power of two
# (100); the tiling family checks every other class.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": dict(T=(1, 2, 15, 17, 63, 64, 65, 70, 100, 128), B=(1, 2), H=(1, 2, 3),
                head=(8, 5, 12, 16, 24, 32), segment=40),
    "cuda": dict(T=(1, 63, 64, 65, 100, 200, 255, 1000, 2048), B=(1, 2), H=(1, 2, 4),
                 head=(64, 32, 100, 128), segment=700),
}
# The long-sequence family: lengths, and the gate strength that takes log gates to about
# -60 per step (20 * logsigmoid(x) for x ~ N(0, 1) reaches -60 at x ~ -3).
LONG_T = {"cpu": (256, 1024, 2048), "cuda": (1024, 4096, 16384, 65536)}
LONG_HEAD = {"cpu": 16, "cuda": 64}
STRONG_GATE = 20.0
GATE_STRENGTHS = (1.0 / 16, 1.0, 8.0)
# Or log gates uniform in a range (overrides the strength): the inputs peers report errors on.
GATE_RANGES = (None, [-60.0, -5.0])
SCALES = (None, 1.0, 0.3)


@dataclass
class Case:
    """One drawn case of an operator: sizes, layout choices and the seed of its inputs."""

    op: str
    dims: dict[str, int]
    seqlens: list[int] | None = None  # varlen: B == 1 and these lengths pack T
    scale: float | None = None
    initial_state: bool = False
    output_final_state: bool = True
    gate: float = 1.0  # strength of the decay gates: log gate = gate * logsigmoid(x)
    # [lo, hi]: log gates uniform in it instead (as peers report their errors: [-60, -5])
    gate_range: list[float] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # The causality family's planted value: {"input", "seq", "t", "value"}: ``value`` ("nan",
    # "inf", "-inf") at token ``t`` of sequence ``seq`` of input ``input`` (every channel).
    poison: dict[str, Any] | None = None

    def __post_init__(self):
        if self.gate_range is not None:
            r = self.gate_range
            if (not isinstance(r, (list, tuple)) or len(r) != 2
                    or not all(isinstance(x, (int, float)) for x in r) or not r[0] <= r[1] <= 0):
                raise ValueError(f"gate_range: expected [lo, hi] with lo <= hi <= 0 (log gates), "
                                 f"got {r!r}")
            self.gate_range = [float(r[0]), float(r[1])]

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("poison", "gate_range"):  # a case without one reads as it always has
            if data[key] is None:
                del data[key]
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Case":
        """A case from its JSON (as a failure prints it); ValueError naming what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc}): {text!r}") from None
        if not isinstance(data, dict) or "op" not in data or "dims" not in data:
            raise ValueError(f"expected a JSON case with 'op' and 'dims', got {text!r}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} in {text!r}")
        if data["op"] not in OPERATORS:
            raise ValueError(f"unknown operator {data['op']!r}; known: {', '.join(OPERATORS)}")
        return cls(**data)

    @property
    def operator(self) -> Operator:
        return OPERATORS[self.op]

    def label(self) -> str:
        d = ",".join(f"{k}={v}" for k, v in self.dims.items())
        extra = [f"seqlens={self.seqlens}"] if self.seqlens is not None else []
        extra += [f"{k}={v}" for k, v in sorted(self.options.items()) if v]
        if self.initial_state:
            extra.append("h0")
        if self.operator.gated and self.gate_range is not None:
            extra.append(f"log gates in [{self.gate_range[0]:g}, {self.gate_range[1]:g}]")
        elif self.operator.gated:
            extra.append(f"gate={self.gate:g}")
        if self.poison:
            p = self.poison
            extra.append(f"{p['value']} in {p['input']}[seq {p['seq']}, t={p['t']}]")
        return " ".join([d] + extra)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments (besides the tensors) every implementation receives."""
        op = self.operator
        kw: dict[str, Any] = {"scale": self.scale}
        if op.has_state:
            kw["output_final_state"] = self.output_final_state
        kw.update({k: self.options[k] for k in op.kwargs if k in self.options})
        return kw


@st.composite
def case_strategy(draw: Callable, op_name: str, profile: str = "cpu") -> Case:
    """Hypothesis strategy for cases of one operator. Every choice shrinks to its first value."""
    op, p = OPERATORS[op_name], PROFILES[profile]
    varlen = draw(st.booleans())
    seqlens = None
    if varlen:
        seg = st.one_of(st.sampled_from([0, 1]), st.integers(2, p["segment"]))
        seqlens = draw(st.lists(seg, min_size=1, max_size=4))
        if sum(seqlens) == 0:
            seqlens[-1] = 1
        B, T = 1, sum(seqlens)
    else:
        B, T = draw(st.sampled_from(p["B"])), draw(st.sampled_from(p["T"]))
    H = draw(st.sampled_from(p["H"]))
    head = st.sampled_from(p["head"])
    dims: dict[str, int] = {"B": B, "T": T}
    if "G" in op.dims:
        dims["G"] = draw(st.sampled_from([g for g in range(1, H + 1) if H % g == 0]))
    dims["H"] = H
    if "D" in op.dims:
        dims["D"] = draw(head)
    else:
        dims["K"], dims["V"] = draw(head), draw(head)
    if "L" in op.dims:
        dims["L"] = levels_needed(max(seqlens) if seqlens else T) + draw(st.sampled_from([0, 1]))
    options = {name: draw(st.sampled_from(values)) for name, values in op.options.items()}
    return Case(
        op=op.name,
        dims=dims,
        seqlens=seqlens,
        scale=draw(st.sampled_from(SCALES)),
        initial_state=draw(st.booleans()) if op.has_state else False,
        output_final_state=draw(st.sampled_from([True, False])) if op.has_state else False,
        gate=draw(st.sampled_from(GATE_STRENGTHS)) if op.gated else 1.0,
        gate_range=draw(st.sampled_from(GATE_RANGES)) if op.gated else None,
        options=options,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def case_dims(op_name: str, B: int, T: int, H: int, K: int, V: int | None = None,
              G: int | None = None) -> dict[str, int]:
    """The sizes of a case of ``op_name``: K = V = D for the operators with one head dim, G q/k
    groups (default H) and just enough levels L where the operator has them."""
    op = OPERATORS[op_name]
    dims: dict[str, int] = {"B": B, "T": T}
    if "G" in op.dims:
        dims["G"] = H if G is None else G
    dims["H"] = H
    if "D" in op.dims:
        dims["D"] = K
    else:
        dims["K"], dims["V"] = K, K if V is None else V
    if "L" in op.dims:
        dims["L"] = levels_needed(T)
    return dims


def _fixed(op_name: str, dims: dict[str, int], seed: int, gate: float = 1.0) -> Case:
    """A fixed case: the operator's first option values, initial and final state if it has them."""
    op = OPERATORS[op_name]
    options = {name: values[0] for name, values in op.options.items()}
    return Case(op=op_name, dims=dims, initial_state=op.has_state,
                output_final_state=op.has_state, gate=gate if op.gated else 1.0,
                options=options, seed=seed)


def long_cases(op_name: str, profile: str = "cpu", lengths: tuple[int, ...] | None = None) -> list[Case]:
    """The long-sequence family: one head pair, strong gates, an initial state, growing T."""
    head = LONG_HEAD[profile]
    return [_fixed(op_name, case_dims(op_name, 1, T, 2, head, G=1), 1000 + i, STRONG_GATE)
            for i, T in enumerate(lengths or LONG_T[profile])]


# The tiling family: one case per head-dim class the kernels tile differently (every pair of
# the powers of two, and pairs that are not powers of two), with both states. Triton 3.6
# miscompiled narrow tiles of the delta rule's kernels in bfloat16 and float16 on the GPU while
# float32 and the interpreter were right (reports/delta_rule.md), so every kernel's classes are
# checked on the GPU in both half dtypes: `harness check OP --family tiling --dtype
# bfloat16,float16`. The CPU profile keeps the interpreter's run short.
TILING_HEADS = {
    "cpu": ((8, 16, 32), ((12, 8), (5, 16), (12, 5))),
    "cuda": ((16, 32, 64, 128, 256), ((48, 32), (100, 32), (48, 100))),
}
TILING_T = {"cpu": 70, "cuda": 200}  # a full chunk of 64 and a tail (three tails on a GPU)
# The mini-batch is a tile too (TTT's and Titans' C x D tiles): on a GPU the family also takes
# each of these chunk sizes the operator offers at every power-of-two head size (T = 200: three
# full 64-token mini-batches and a tail of 8). The interpreter checks the same indexing at 16.
TILING_CHUNKS = {"cpu": (), "cuda": (32, 64)}


def tiling_cases(op_name: str, profile: str = "cpu") -> list[Case]:
    """The tiling family: (K, V) over every pair of TILING_HEADS, or D over each head size for
    the operators with one head dim, each at the operator's first options, then D over the
    powers of two at each larger chunk_size of TILING_CHUNKS; B = 1, H = 2."""
    op = OPERATORS[op_name]
    powers, others = TILING_HEADS[profile]
    if "D" in op.dims:
        pairs = [(d, d) for d in powers] + [(k, k) for k, _ in others]
    else:
        pairs = [(k, v) for k in powers for v in powers] + list(others)
    T = TILING_T[profile]
    cases = [_fixed(op_name, case_dims(op_name, 1, T, 2, K, V, G=1), 2000 + i)
             for i, (K, V) in enumerate(dict.fromkeys(pairs))]
    sizes = [c for c in TILING_CHUNKS[profile] if c in op.options.get("chunk_size", ())]
    for c in sizes:
        for d in powers:
            case = _fixed(op_name, case_dims(op_name, 1, T, 2, d, d, G=1), 2000 + len(cases))
            cases.append(replace(case, options=dict(case.options, chunk_size=c)))
    return cases


# The causality family: a non-finite value planted at one token of one input must reach no
# output before that token and no other sequence (docs/check.md). Lengths span several chunks of
# 64; every other case is varlen; the input, sequence, token and value go round in turn.
CAUSALITY = {"cpu": dict(cases=6, T=(70, 100), head=(8, 16)),
             "cuda": dict(cases=12, T=(200, 1000), head=(64, 128))}
POISONS = ("nan", "inf", "-inf")


def causality_cases(op_name: str, profile: str = "cpu") -> list[Case]:
    """The causality family: one planted non-finite value per case (``Case.poison``)."""
    op, p = OPERATORS[op_name], CAUSALITY[profile]
    rng = random.Random(3000)
    cases = []
    for i in range(p["cases"]):
        T, head = p["T"][i % len(p["T"])], p["head"][(i // 2) % len(p["head"])]
        seqlens = None
        if i % 2:  # three sequences, the first one short
            first = rng.randrange(1, T // 4)
            second = rng.randrange(1, T - first)
            seqlens = [first, second, T - first - second]
        lengths = seqlens or [T, T]
        dims = case_dims(op_name, 1 if seqlens else len(lengths), T, 2, head, G=1)
        if "L" in dims:
            dims["L"] = levels_needed(max(lengths))
        case = replace(_fixed(op_name, dims, 3000 + i), seqlens=seqlens)
        names = [inp.name for inp in op.inputs if not inp.state and inp.present(case)
                 and inp.shapes[inp.pick(case)][:2] == ("B", "T")]
        seq = rng.randrange(len(lengths))
        poison = {"input": names[i % len(names)], "seq": seq, "t": rng.randrange(lengths[seq]),
                  "value": POISONS[i % len(POISONS)]}
        cases.append(replace(case, poison=poison))
    return cases


def without(case: Case, features: tuple[str, ...]) -> Case:
    """``case`` without some of its features: "states" (no initial or final state), "varlen"
    (one sequence of the same T), "options" (every option at its first value)."""
    op = case.operator
    if "states" in features:
        case = replace(case, initial_state=False, output_final_state=False)
    if "varlen" in features and case.seqlens is not None:
        dims = dict(case.dims)
        if "L" in dims:
            dims["L"] = max(dims["L"], levels_needed(dims["T"]))
        poison = case.poison
        if poison is not None:  # the same token, now of the one sequence
            poison = {**poison, "seq": 0, "t": sum(case.seqlens[:poison["seq"]]) + poison["t"]}
        case = replace(case, seqlens=None, dims=dims, poison=poison)
    if "options" in features:
        case = replace(case, options={name: values[0] for name, values in op.options.items()})
    return case


REDUCTIONS = (("states",), ("varlen",), ("options",), ("states", "varlen"),
              ("states", "options"), ("varlen", "options"), ("states", "varlen", "options"))


def reduced(case: Case, supports: Callable[[Case], str | None]) -> Case | None:
    """The case with the fewest features taken away (``without``) that ``supports`` accepts,
    or None: how an implementation that declines a feature still gets cases."""
    for features in REDUCTIONS:
        smaller = without(case, features)
        if smaller != case and supports(smaller) is None:
            return smaller
    return None


# Value domains (docs/operators.md): each draws float64 values of a shape from a generator.
def _randn(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _log_gate(shape, case, gen):
    """gate * logsigmoid(x), x standard normal; or uniform in case.gate_range."""
    if case.gate_range is not None:
        lo, hi = case.gate_range
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
    return case.gate * F.logsigmoid(_randn(shape, gen))


DOMAINS: dict[str, Callable[[tuple[int, ...], Case, torch.Generator], torch.Tensor]] = {
    "normal": lambda s, c, g: _randn(s, g),
    "small": lambda s, c, g: 0.1 * _randn(s, g),
    "unit": lambda s, c, g: F.normalize(_randn(s, g), dim=-1),  # unit-norm keys/queries
    "unit_interval": lambda s, c, g: torch.sigmoid(_randn(s, g)),  # beta, level scales
    "log_gate": lambda s, c, g: _log_gate(s, c, g),  # log gates <= 0
    "keep": lambda s, c, g: torch.exp(_log_gate(s, c, g)),  # in (0, 1]
    "forget": lambda s, c, g: -torch.expm1(_log_gate(s, c, g)),  # in [0, 1)
    "learning_rate": lambda s, c, g: 0.1 * torch.sigmoid(_randn(s, g)),
    "ln_weight": lambda s, c, g: 1.0 + 0.1 * _randn(s, g),
    "ln_bias": lambda s, c, g: 0.1 * _randn(s, g),
}


def sample(case: Case, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The case's arguments: float64 tensors (drawn on the CPU from the case's seed, then
    moved), cu_seqlens, and the keyword options."""
    op = case.operator
    gen = torch.Generator().manual_seed(case.seed)
    sizes = dict(case.dims)
    sizes["N"] = len(case.seqlens) if case.seqlens is not None else case.dims["B"]
    args: dict[str, Any] = {}
    for inp in op.inputs:
        if not inp.present(case):
            args[inp.name] = None
            continue
        shape = tuple(s if isinstance(s, int) else sizes[s] for s in inp.shapes[inp.pick(case)])
        args[inp.name] = DOMAINS[inp.domain_for(case)](shape, case, gen).to(device)
    args["cu_seqlens"] = None
    if case.seqlens is not None:
        offsets = [0]
        for n in case.seqlens:
            offsets.append(offsets[-1] + n)
        args["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int64, device=device)
    args.update(case.kwargs())
    return args


def cast_args(args: dict[str, Any], case: Case, dtype: torch.dtype, grad: bool) -> dict[str, Any]:
    """The case's float64 arguments in ``dtype`` (states in float32 at least), as leaves."""
    op = case.operator
    out = dict(args)
    for inp in op.inputs:
        x = args.get(inp.name)
        if x is None:
            continue
        target = torch.promote_types(dtype, torch.float32) if inp.state else dtype
        x = x.detach().to(target)
        out[inp.name] = x.requires_grad_(grad and inp.differentiable)
    return out
