"""The check engine catches what it exists to catch: wrong math (shrunk to a minimal case and
reproducible from the printed command), unwritten outputs, missing final states, a forward
without gradients that differs; nothing checked is not a pass (faults, aborts and hangs:
tests/test_check_faults.py).

Implementations registered here at run time (the planted ones) run with --no-isolate: a worker
process only knows the built-ins and plugins (the isolation tests load theirs with --plugin)."""

import shlex
import time

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from harness.cases import Case, sample
from harness.check.engine import evaluate, rel_error
from harness.check.families import check_family
from harness.cli import app
from harness.registry import Implementation, get, register, unregister
from references.gla import chunk_gla_ref

runner = CliRunner()


def gla_gate_off_by_one(q, k, v, gk=None, gv=None, **kw):
    """A planted bug: the gate cumsum shifted by one token (an exclusive cumsum where the
    recurrence needs an inclusive one): token t decays by gk_{t-1} instead of gk_t."""
    if gk is not None:
        gk = torch.cat([torch.zeros_like(gk[:, :1]), gk[:, :-1]], dim=1)
    return chunk_gla_ref(q, k, v, gk, gv, **kw)


@pytest.fixture
def planted():
    impl = register(Implementation(op="gla", name="planted_bug", kind="reference",
                                   target=gla_gate_off_by_one), replace=True)
    yield impl
    unregister("gla", "planted_bug")


def test_planted_bug_is_caught_shrunk_and_reproduced(planted):
    result = runner.invoke(app, ["check", "gla", "--impl", "planted_bug", "--dtype", "float64",
                                 "--examples", "20", "--family", "random", "--device", "cpu",
                                 "--no-isolate"])
    assert result.exit_code == 1, result.output
    assert "FAILED on case" in result.output
    command = result.output.split("reproduce with:")[1].strip().replace("\n", "")
    argv = shlex.split(command)
    assert argv[:3] == ["harness", "check", "gla"]
    case = Case.from_json(argv[argv.index("--case") + 1])
    # shrunk: hypothesis minimises every choice. The shifted gate shows on one token decaying
    # the initial state, or on the second of two tokens.
    assert case.dims["B"] == 1 and case.dims["H"] == 1 and case.seqlens is None
    assert (case.dims["T"], case.initial_state) in ((1, True), (2, False)), case
    again = runner.invoke(app, argv[1:] + ["--no-isolate"])
    assert again.exit_code == 1, again.output
    assert "planted_bug float64" in again.output


def test_correct_implementation_passes_on_the_same_case(planted):
    case = Case(op="gla", dims=dict(B=1, T=2, H=1, K=8, V=8), seed=0)
    rows = evaluate(case, [get("gla", "chunk_ref"), planted], ["float64"], "cpu")
    by_impl = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r["passed"])
    assert all(by_impl["chunk_ref"]) and not all(by_impl["planted_bug"])


def leaves_last_token_unwritten(q, k, v, beta, **kw):
    from references.delta_rule import naive_recurrent_delta_rule

    o, s = naive_recurrent_delta_rule(q, k, v, beta, **kw)
    out = torch.empty_like(o)  # poisoned with NaN by the harness
    out[:, :-1] = o[:, :-1]
    return out, s


def drops_final_state(q, k, v, beta, **kw):
    from references.delta_rule import naive_recurrent_delta_rule

    return naive_recurrent_delta_rule(q, k, v, beta, **kw)[0], None


@pytest.mark.parametrize("fn, note", [(leaves_last_token_unwritten, ""),
                                      (drops_final_state, "final_state missing")])
def test_unwritten_output_and_missing_state_fail(fn, note):
    impl = Implementation(op="delta_rule", name="broken", kind="reference", target=fn)
    case = Case(op="delta_rule", dims=dict(B=1, T=5, H=1, K=4, V=4), seed=3)
    rows = evaluate(case, [impl], ["float32"], "cpu")
    bad = [r for r in rows if not r["passed"]]
    assert bad, rows
    assert any(note in r["note"] for r in bad)


def test_final_state_returned_when_not_asked_fails():
    impl = Implementation(op="delta_rule", name="chatty", kind="reference",
                          target=lambda **kw: get("delta_rule", "naive")(**{**kw, "output_final_state": True}))
    case = Case(op="delta_rule", dims=dict(B=1, T=3, H=1, K=4, V=4), output_final_state=False)
    rows = evaluate(case, [impl], ["float64"], "cpu")
    assert [r["note"] for r in rows if not r["passed"]] == [
        "final state returned with output_final_state=False"]


def wrong_without_gradients(q, k, v, beta, **kw):
    """The delta rule, its output off by 1% when no input needs a gradient (a second forward
    path, as a kernel that picks one for inference has)."""
    from references.delta_rule import naive_recurrent_delta_rule

    o, s = naive_recurrent_delta_rule(q, k, v, beta, **kw)
    return (o if torch.is_grad_enabled() and q.requires_grad else o * 1.01), s


def raises_without_gradients(q, k, v, beta, **kw):
    from references.delta_rule import naive_recurrent_delta_rule

    if not q.requires_grad:
        raise RuntimeError("inference kernel exploded")
    return naive_recurrent_delta_rule(q, k, v, beta, **kw)


def test_a_forward_without_gradients_that_raises_fails_the_outputs():
    impl = Implementation(op="delta_rule", name="two_paths", kind="reference",
                          target=raises_without_gradients, inference_path=True)
    case = Case(op="delta_rule", dims=dict(B=1, T=5, H=1, K=4, V=4), seed=3)
    rows = {r["quantity"]: r for r in evaluate(case, [impl], ["float32"], "cpu")}
    for name in ("o", "final_state"):  # the gradients come from the forward that ran
        assert not rows[name]["passed"] and "inference kernel exploded" in rows[name]["note"]
    assert rows["dq"]["passed"]


@pytest.mark.parametrize("declared", [True, False])
def test_the_forward_without_gradients_is_checked_when_declared(declared):
    impl = Implementation(op="delta_rule", name="two_paths", kind="reference",
                          target=wrong_without_gradients, inference_path=declared)
    case = Case(op="delta_rule", dims=dict(B=1, T=5, H=1, K=4, V=4), seed=3)
    rows = {r["quantity"]: r for r in evaluate(case, [impl], ["float32"], "cpu")}
    o = rows["o"]
    # The 1% error is 1e-2 relative, float32's tolerance here about 1e-5: caught, and the
    # note says which forward; undeclared, the forward with gradients alone is compared.
    assert o["passed"] is not declared, o
    assert ("without gradients" in o["note"]) is declared
    assert (o["error"] > 9e-3) is declared
    assert all(r["passed"] for q, r in rows.items() if q != "o")


def test_exception_becomes_a_failed_row():
    def boom(**kw):
        raise RuntimeError("kernel exploded")

    impl = Implementation(op="delta_rule", name="boom", kind="reference", target=boom)
    rows = evaluate(Case(op="delta_rule", dims=dict(B=1, T=3, H=1, K=4, V=4)), [impl], ["float32"], "cpu")
    assert rows and not any(r["passed"] for r in rows)
    assert "RuntimeError: kernel exploded" in rows[0]["note"]


@pytest.mark.parametrize("env, device, expected", [
    (None, "cuda", "cpu"), ("auto", "cuda", "cpu"), ("auto", "cpu", "cpu"), ("cpu", "cuda", "cpu"),
    ("device", "cuda", "cuda"), ("device", "cpu", "cpu")])
def test_reference_device(monkeypatch, env, device, expected):
    from harness.check.engine import REF_DEVICE_ENV, reference_device
    if env is None:
        monkeypatch.delenv(REF_DEVICE_ENV, raising=False)
    else:
        monkeypatch.setenv(REF_DEVICE_ENV, env)
    assert reference_device(device) == expected


def test_unknown_reference_device_is_refused(monkeypatch):
    from harness.check.engine import REF_DEVICE_ENV, reference_device
    monkeypatch.setenv(REF_DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="LINATTN_REF_DEVICE: expected one of auto, cpu, device, got 'tpu'"):
        reference_device("cuda")
    result = runner.invoke(app, ["check", "delta_rule", "--device", "cpu", "--ref-device", "tpu"])
    assert result.exit_code != 0 and "--ref-device" in result.output


def test_references_on_another_device_give_the_same_rows(monkeypatch, planted):
    """The truth and the references on their own device (here "cpu:0" against the
    implementations' "cpu", which takes the two-device path): every row as on one device, and
    each side fed its own device's inputs (told apart by storage: float64 inputs are not
    copied on their way to a run)."""
    import harness.check.engine as check
    case = Case(op="gla", dims=dict(B=1, T=9, H=1, K=4, V=4), initial_state=True, seed=5)
    impls = [get("gla", "chunk_ref"), planted]
    one = evaluate(case, impls, ["float64", "float32"], "cpu")
    monkeypatch.setattr(check, "reference_device", lambda device: "cpu:0")
    drawn, fed = {}, []
    real_sample, real_run = check.sample, check.run

    def spy_sample(case_, device="cpu"):
        args = real_sample(case_, device)
        drawn.setdefault(str(device), set()).add(args["q"].untyped_storage().data_ptr())
        return args

    def spy_run(fn, args, case_, dtype, douts, **kw):
        if args["q"].dtype == torch.float64:  # the float64 pass; poison: an implementation
            fed.append((kw.get("poison", False), args["q"].untyped_storage().data_ptr()))
        return real_run(fn, args, case_, dtype, douts, **kw)

    monkeypatch.setattr(check, "sample", spy_sample)
    monkeypatch.setattr(check, "run", spy_run)
    two = evaluate(case, impls, ["float64", "float32"], "cpu")
    assert set(drawn) == {"cpu", "cpu:0"} and not drawn["cpu"] & drawn["cpu:0"]
    assert {p for poison, p in fed if poison} <= drawn["cpu"]
    assert {p for poison, p in fed if not poison} <= drawn["cpu:0"]
    assert any(poison for poison, _ in fed) and any(not poison for poison, _ in fed)
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert (a["impl"], a["quantity"], a["dtype"], a["passed"]) == (b["impl"], b["quantity"], b["dtype"], b["passed"])
        assert a["error"] == b["error"] and a["ref_error"] == b["ref_error"]
    assert not all(r["passed"] for r in two if r["impl"] == "planted_bug")


def test_a_gradient_of_few_numbers_takes_the_references_worst_error_over_more_draws(monkeypatch):
    """Titans' dtheta at T = 1 is one number per head: the float32 reference's error on it
    under the case's upstream gradients was 1.7e-7 (this seed), under other draws up to 1.5e-6,
    and a kernel's error is such a draw too. So the tolerance takes the worst over
    FEW_DRAWS more draws for a gradient of at most FEW_NUMBERS numbers, and the one draw for a
    larger one (dq: 64 numbers)."""
    from harness.check import engine

    case = Case.from_json('{"dims":{"B":1,"D":64,"H":1,"T":1},"gate":0.0625,'
                          '"initial_state":false,"op":"titans","options":{"chunk_size":16},'
                          '"output_final_state":true,"scale":null,"seed":5,"seqlens":null}')

    def ref_errors(draws):
        monkeypatch.setattr(engine, "FEW_DRAWS", draws)
        return engine.truths(case, ["chunk"], ["float32"], "cpu", "random")["float32"].ref_errors

    draws = engine.FEW_DRAWS
    one, worst = ref_errors(0), ref_errors(draws)
    assert worst["dtheta"] > 4 * one["dtheta"], (one["dtheta"], worst["dtheta"])
    assert worst["dq"] == one["dq"]


def test_rel_error():
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(ref, ref) == 0.0
    assert rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_error(torch.tensor([float("nan"), 4.0]), ref) == float("inf")
    assert rel_error(torch.zeros(3), ref) == float("inf")  # wrong shape
    assert rel_error(None, ref) == float("inf")


def test_sample_is_reproducible_and_in_domain():
    case = Case(op="gla", dims=dict(B=1, T=9, H=2, K=4, V=3), seqlens=[0, 4, 0, 5], gate=8.0,
                initial_state=True, seed=7)
    a, b = sample(case), sample(case)
    assert torch.equal(a["q"], b["q"]) and torch.equal(a["gk"], b["gk"])
    assert (a["gk"] <= 0).all() and a["gk"].min() < -8
    assert a["cu_seqlens"].tolist() == [0, 0, 4, 4, 9]
    assert a["initial_state"].shape == (4, 2, 4, 3)
    assert Case.from_json(case.to_json()) == case


def test_a_gate_range_draws_uniform_log_gates_and_is_kept_in_the_json():
    """gate_range reproduces the inputs peers report errors on (log gates uniform in [-60, -5]);
    a case without it has the JSON it always had (baselines are keyed by it)."""
    case = Case(op="gla", dims={"B": 1, "T": 300, "H": 2, "K": 8, "V": 8}, gate_range=[-60, -5])
    g = sample(case)["gk"]
    assert -60 <= g.min() < -59 and -6 < g.max() <= -5 and abs(g.mean() + 32.5) < 0.5
    assert Case.from_json(case.to_json()) == case and "log gates in [-60, -5]" in case.label()
    assert "gate_range" not in Case(op="gla", dims=case.dims).to_json()
    with pytest.raises(ValueError, match="gate_range: expected"):
        Case(op="gla", dims=case.dims, gate_range=[-5, -60])


def test_random_family_records_every_case():
    res = check_family("random", "delta_rule", [get("delta_rule", "chunk_ref")], ["float64"],
                       "cpu", examples=5, seed=1)
    assert res.failures == [] and res.examples == 5
    assert len({r["case_json"] for r in res.rows}) == 5
    assert max(r["error"] for r in res.rows) < 1e-12


@pytest.mark.parametrize("op", ["ttt", "titans"])
def test_tiling_family_on_a_gpu_takes_the_larger_mini_batches(op):
    """The mini-batch is a tile of TTT's and Titans' kernels: on a GPU the tiling family holds
    every power-of-two D at chunk sizes 16, 32 and 64 (T = 200: a tail at each), and the other
    head sizes at the first; operators without a chunk_size keep their (K, V) classes alone."""
    from harness.cases import TILING_HEADS, tiling_cases

    powers, others = TILING_HEADS["cuda"]
    got = [(c.dims["D"], c.options["chunk_size"], c.dims["T"]) for c in tiling_cases(op, "cuda")]
    heads = dict.fromkeys([*powers, *(k for k, _ in others)])  # 48 once
    want = [(d, 16, 200) for d in heads] + [(d, c, 200) for c in (32, 64) for d in powers]
    assert got == want
    assert all(c.options["chunk_size"] == 16 for c in tiling_cases(op, "cpu"))
    assert len(tiling_cases("delta_rule", "cuda")) == len(powers) ** 2 + len(others)


def test_long_family_writes_error_against_T(tmp_path):
    result = runner.invoke(app, ["check", "gla", "--family", "long", "--long-t", "64,256",
                                 "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    df = pd.read_csv(tmp_path / "gla.csv")
    # chunk_ref is the truth here; ours: the step loop and the three kernels
    assert set(df["T"]) == {64, 256} and set(df["impl"]) == {"naive", "fused_recurrent", "chunk",
                                                             "fused_chunk"}
    assert df["passed"].all() and (df["error"] < 1e-5).all()
    assert (tmp_path / "gla_long.png").stat().st_size > 1000


def test_check_writes_each_case_as_it_ends(tmp_path, monkeypatch):
    """A progress line per case and its rows in <op>_cases.jsonl as each case ends, so a check
    stopped before its end (here an interrupt while the second case's truth is computed)
    keeps the cases it finished, and its table is built from them."""
    import json

    import harness.check.unit as unit_mod

    # the step-loop reference alone: what is written as a case ends does not depend on which
    # implementations ran (all of GLA's kernels through the interpreter: 34 s; this: seconds)
    argv = ["check", "gla", "--family", "long", "--long-t", "64,128", "--impl", "naive",
            "--device", "cpu", "--out", str(tmp_path)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "case 1: " in result.output and "case 2: " in result.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "gla.csv")
    lines = [json.loads(x) for x in (tmp_path / "gla_cases.jsonl").read_text().splitlines()]
    assert len(lines) == len(table) and {r["T"] for r in lines} == {64, 128}
    assert sorted(r["error"] for r in lines) == pytest.approx(sorted(table["error"]))

    truths = unit_mod.truths
    def killed_at_128(case, *args):
        if case.dims["T"] == 128:
            raise KeyboardInterrupt
        return truths(case, *args)
    monkeypatch.setattr(unit_mod, "truths", killed_at_128)
    stopped = runner.invoke(app, argv + ["--no-isolate"])  # the first case ends before the second
    assert "interrupted" in stopped.output and stopped.exit_code == 130  # no verdict of success
    assert "gla on cpu: 1 cases in" in stopped.output
    kept = [json.loads(x) for x in (tmp_path / "gla_cases.jsonl").read_text().splitlines()]
    assert kept and {r["T"] for r in kept} == {64}
    assert sorted(r["error"] for r in kept) == pytest.approx(
        sorted(table[table["T"] == 64]["error"]))
    assert set(pd.read_csv(tmp_path / "gla.csv")["T"]) == {64}  # the table: what finished


def test_a_case_every_implementation_declines_computes_no_truth(tmp_path, monkeypatch):
    """TTT's kernels take chunk sizes 16, 32 and 64: a case with 4-token mini-batches is
    declined by both, so its float64 truth (70 s on a GPU host at T = 717) is not computed and
    its rows say why; the references, checked too, still need it."""
    import harness.check.unit as unit_mod

    calls = []
    real = unit_mod.truths
    monkeypatch.setattr(unit_mod, "truths", lambda case, *a: calls.append(case) or real(case, *a))
    case = Case(op="ttt", dims=dict(B=1, T=20, H=1, D=8), options={"chunk_size": 4}, seed=1)
    argv = ["check", "ttt", "--impl", "chunk,fused_chunk", "--dtype", "float32", "--device",
            "cpu", "--case", case.to_json(), "--no-isolate", "--out", str(tmp_path)]
    result = runner.invoke(app, argv)
    assert result.exit_code != 0 and "nothing compared" in result.output, result.output
    assert calls == []
    rows = pd.read_csv(tmp_path / "ttt.csv")
    assert set(rows["status"]) == {"skipped"} and len(rows) == 2
    assert rows["note"].str.contains("chunk_size must be one of").all()
    calls.clear()
    runner.invoke(app, argv[:3] + ["chunk,naive"] + argv[4:])
    rows = pd.read_csv(tmp_path / "ttt.csv")
    naive = rows[rows["impl"] == "naive"]
    assert len(calls) == 1 and len(naive) > 1 and naive["passed"].all()
    assert list(rows[rows["impl"] == "chunk"]["status"]) == ["skipped"]
    import harness.check.engine as engine  # the gate's path: evaluate
    monkeypatch.setattr(engine, "truths", lambda *a: pytest.fail("a truth for nothing"))
    rows = evaluate(case, [get("ttt", "chunk")], ["float32"], "cpu")
    assert [r["status"] for r in rows] == ["skipped"]


def test_a_declined_case_is_followed_by_its_reduced_form():
    """Our TTT kernels decline 4-token mini-batches: each such case is followed at once by
    the case with the option at its first value, for them alone, up to a quarter of the family's cases."""
    from harness.check.families import with_coverage

    cases = [Case(op="ttt", dims=dict(B=1, T=20 + i, H=1, D=8),
                  options={"chunk_size": 4 if i % 2 else 16}, seed=i) for i in range(8)]
    chunk, naive = get("ttt", "chunk"), get("ttt", "naive")
    plan = with_coverage(cases, [chunk, naive])
    assert [c for c, impls in plan if len(impls) == 2] == cases
    added = [(i, c) for i, (c, impls) in enumerate(plan) if impls == [chunk]]
    assert len(added) == 2  # a quarter of 8
    for i, c in added:
        before = plan[i - 1][0]
        assert before.options == {"chunk_size": 4} and c.options == {"chunk_size": 16}
        assert c.dims == before.dims and c.seed == before.seed


def test_long_family_runs_the_chunked_reference_alone_unless_the_step_loop_is_checked():
    # At 64K tokens the step loop took minutes per dtype on the host; the chunked reference
    # alone can only make the tolerance tighter (the worse of fewer references).
    from harness.check.engine import dtype_references

    assert dtype_references("random", ["chunk"]) == ["naive", "chunk_ref"]
    assert dtype_references("long", ["chunk"]) == ["chunk_ref"]
    assert dtype_references("long", ["naive", "chunk"]) == ["naive", "chunk_ref"]


def test_max_time_stops_drawing_and_says_so(tmp_path):
    # A deadline already past: no case is evaluated, the summary says the run was cut short,
    # and a run that compared nothing fails instead of a silent "all passed" over nothing.
    result = runner.invoke(app, ["check", "gla", "--impl", "chunk_ref", "--dtype", "float64",
                                 "--examples", "5", "--device", "cpu", "--max-time", "0",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "stopped at --max-time 0 s: 0 cases ran" in result.output
    assert "nothing was compared" in result.output
    import time

    res = check_family("long", "gla", [get("gla", "chunk_ref")], ["float64"], "cpu",
                       lengths=(16, 32), deadline=time.perf_counter() + 3600)
    assert res.examples == 2 and not res.stopped and res.rows


def test_shrinking_past_the_deadline_keeps_the_failure(planted):
    # Past the deadline the shrinking pass evaluates nothing new: the failure found is reported
    # as it was (hypothesis rejecting every draw must not lose it).
    import time

    from harness.check.families import shrink
    from harness.check.runner import CaseFailed, InProcess, Setup, TruthMaker

    case = Case(op="gla", dims=dict(B=1, T=2, H=1, K=8, V=8), seed=0)
    rows = evaluate(case, [planted], ["float64"], "cpu")
    setup = Setup(device="cpu", dtypes=["float64"], isolate=False,
                  deadline=time.perf_counter() - 1)
    kept = shrink("gla", planted, CaseFailed(case, rows), setup, InProcess(setup),
                  TruthMaker(setup), {}, 5, 0, "cpu")
    assert kept.case == case and kept.rows and not all(r["passed"] for r in kept.rows)


def test_nothing_checked_is_not_a_pass():
    # every case skipped (the interpreter has no bfloat16): exit 1, saying why
    result = runner.invoke(app, ["check", "delta_rule", "--impl", "chunk", "--dtype", "bfloat16",
                                 "--examples", "2", "--family", "random", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "chunk: nothing compared: skipped: the Triton interpreter has no bfloat16" in result.output
    assert "nothing was compared" in result.output and "all checks passed" not in result.output


@pytest.mark.parametrize("args, words", [
    (["--examples", "0"], ["--examples: expected a number of cases >= 1, got 0"]),
    (["--long-t", "abc"], ["--long-t: expected comma-separated positive integers, got 'abc'"]),
    (["--max-time", "-1"], ["--max-time: expected seconds >= 0, got -1"]),
    (["--case", '{"foo":1}'], ["--case: expected a JSON case with 'op' and 'dims'"]),
    (["--case", '{"op":"gla","dims":{},"x":1}'], ["--case: unknown key(s) x"]),
])
def test_bad_options_are_usage_errors_before_any_case(args, words):
    result = runner.invoke(app, ["check", "gla", "--device", "cpu"] + args)
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output
    assert result.output.count("--case:") <= 1


def leaks_the_future(q, k, v, beta, **kw):
    """A planted kernel whose every output is multiplied by zero with every token of the batch
    (as a chunk's dense products are: 0 * NaN = NaN)."""
    from references.delta_rule import naive_recurrent_delta_rule

    o, s = naive_recurrent_delta_rule(q, k, v, beta, **kw)
    everything = sum(x.sum(1, keepdim=True).sum(-1, keepdim=True) for x in (q, k, v))
    return o + 0 * (everything + beta.sum(1, keepdim=True)[..., None]), s


def test_causality_family_catches_a_future_leak():
    leaky = Implementation(op="delta_rule", name="leaky", kind="peer", target=leaks_the_future)
    ours = [get("delta_rule", name) for name in ("fused_recurrent", "chunk")]
    result = check_family("causality", "delta_rule", [leaky, *ours], ["float32"], "cpu")
    by_impl = {}
    for r in result.rows:
        by_impl.setdefault((r["impl"], r["quantity"]), []).append(r["passed"])
    assert not all(by_impl[("leaky", "leak")])  # a NaN at the last token reached t = 0
    for name in ("fused_recurrent", "chunk"):  # chunk: since its chunks mask with where
        assert all(by_impl[(name, "leak")]) and all(by_impl[(name, "non-finite")])
        assert len(by_impl[(name, "leak")]) == 6


def leaks_with_gradients(q, k, v, beta, **kw):
    """leaks_the_future on its forward with gradients alone (a training path of its own)."""
    from references.delta_rule import naive_recurrent_delta_rule

    if q.requires_grad:
        return leaks_the_future(q, k, v, beta, **kw)
    return naive_recurrent_delta_rule(q, k, v, beta, **kw)


@pytest.mark.parametrize("declared", [True, False])
def test_causality_runs_both_forwards_of_an_inference_path(declared):
    leaky = Implementation(op="delta_rule", name="leaky_training", kind="peer",
                           target=leaks_with_gradients, inference_path=declared)
    result = check_family("causality", "delta_rule", [leaky], ["float32"], "cpu")
    leaks = [r["passed"] for r in result.rows if r["quantity"] == "leak"]
    assert leaks and all(leaks) is not declared


def test_check_takes_a_plugin_file(tmp_path):
    """`--plugin FILE.py` registers implementations for this check, as for bench."""
    plugin = tmp_path / "plugged.py"
    plugin.write_text(
        "from harness.registry import Implementation, register\n"
        "def register_all():\n"
        "    register(Implementation(op='delta_rule', name='plugged_ref', kind='reference',\n"
        "                            target='references.delta_rule:chunk_delta_rule_ref'))\n")
    result = runner.invoke(app, ["check", "delta_rule", "--impl", "plugged_ref", "--plugin",
                                 str(plugin), "--examples", "2", "--family", "random",
                                 "--dtype", "float64", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "plugged_ref" in result.output and "all checks passed" in result.output
    missing = runner.invoke(app, ["check", "delta_rule", "--plugin", str(tmp_path / "nope.py"),
                                  "--device", "cpu"])
    assert missing.exit_code == 2 and "--plugin" in missing.output


def test_peers_join_the_named_implementations(tmp_path):
    """`--peers` adds the registered peers available here beside `--impl`'s names, as it does
    to the defaults (a stand-in peer on the CPU: fla's run on CUDA only; GLA, whose registry
    the other tests plant no peers in)."""
    plugin = tmp_path / "peer.py"
    plugin.write_text(
        "from harness.registry import Implementation, register\n"
        "def register_all():\n"
        "    register(Implementation(op='gla', name='stand_in_peer', kind='peer',\n"
        "                            target='references.gla:chunk_gla_ref'))\n")
    args = ["check", "gla", "--impl", "chunk_ref", "--plugin", str(plugin), "--examples",
            "1", "--family", "random", "--dtype", "float64", "--device", "cpu", "--out",
            str(tmp_path)]
    alone = runner.invoke(app, args)
    assert alone.exit_code == 0 and "stand_in_peer" not in alone.output, alone.output
    both = runner.invoke(app, args + ["--peers"])
    assert both.exit_code == 0 and "stand_in_peer" in both.output, both.output
    assert "chunk_ref" in both.output


def test_a_case_without_varlen_keeps_its_planted_token():
    """Coverage takes varlen away from a planted case for an implementation without it: the
    planted value stays on the same token, now of the one sequence."""
    from harness.cases import causality_cases, without
    from harness.check.unit import planted

    case = next(c for c in causality_cases("delta_rule", "cpu") if c.seqlens and c.poison["seq"])
    flat = without(case, ("varlen",))
    assert flat.seqlens is None and flat.poison["seq"] == 0
    a, b = planted(sample(case), case), planted(sample(flat), flat)
    name = case.poison["input"]
    assert torch.equal(torch.isfinite(a[name]), torch.isfinite(b[name]))


SWITCHABLE = '''
import torch
from harness.registry import Implementation, register
from references.gla import chunk_gla_ref

SHIFTED = False  # a switch: the planted gate bug of this file's gla_gate_off_by_one


def gla(q, k, v, gk=None, gv=None, **kw):
    if SHIFTED and gk is not None:
        gk = torch.cat([torch.zeros_like(gk[:, :1]), gk[:, :-1]], dim=1)
    return chunk_gla_ref(q, k, v, gk, gv, **kw)


def register_all():
    register(Implementation(op="gla", name="switchable", kind="triton", target=gla),
             replace=True)
'''


def test_set_checks_an_implementation_under_a_switch_form(tmp_path, monkeypatch):
    """`--set 'LABEL:module.NAME=VALUE'` checks each chosen Triton implementation again as
    NAME[LABEL] with the constant set for its forward and backward, in the worker processes
    too; a failure's replay command carries the form."""
    (tmp_path / "switchable_plugin.py").write_text(SWITCHABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    try:
        result = runner.invoke(app, [
            "check", "gla", "--impl", "switchable", "--plugin", "switchable_plugin", "--set",
            "shifted:switchable_plugin.SHIFTED=True", "--examples", "4", "--family", "random",
            "--dtype", "float64", "--device", "cpu", "--out", str(tmp_path)], terminal_width=200)
    finally:  # later tests choose every registered implementation; the workers know neither
        for name in ("switchable", "switchable[shifted]"):
            unregister("gla", name)
    assert result.exit_code == 1, result.output
    rows = pd.read_csv(tmp_path / "gla.csv")
    assert set(rows["impl"]) == {"switchable", "switchable[shifted]"}
    assert rows[rows["impl"] == "switchable"]["passed"].all()
    assert not rows[rows["impl"] == "switchable[shifted]"]["passed"].all()
    replay = next(line for line in result.output.splitlines() if line.startswith("harness check"))
    argv = shlex.split(replay)
    assert argv[argv.index("--impl") + 1] == "switchable"
    assert argv[argv.index("--set") + 1] == "shifted:switchable_plugin.SHIFTED=True"


@pytest.mark.parametrize("args, words", [
    (["--impl", "chunk_ref", "--set", "x:kernels.gla.chunk.NOPE=1"], "Triton"),
    (["--impl", "chunk", "--set", "no-assignment"], "--set"),
])
def test_set_refuses_a_bad_form_or_no_triton_implementation(args, words):
    result = runner.invoke(app, ["check", "gla", "--device", "cpu"] + args)
    assert result.exit_code == 2 and words in result.output, result.output
