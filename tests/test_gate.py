"""The regression gate catches what it exists to catch: an error that grew, a NaN, an
implementation that vanished or is skipped now, entries the baseline does not know; it reports
improvements without failing, and --update round-trips. Every suite under suites/ loads."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.gate import baseline, run
from harness.gate.suites import SUITES_DIR, SuiteError, available_suites, load_suite
from harness.implementation import KINDS
from harness.registry import Implementation, register, unregister
from references.operators import OPERATORS
from references.delta_rule import chunk_delta_rule_ref
from references.gla import chunk_gla_ref

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"

[ops.delta_rule]
impls = ["chunk_ref", "planted"]
dtypes = ["float64", "float32"]

[[ops.delta_rule.case]]
id = "a"
dims = { B = 1, T = 5, H = 1, K = 4, V = 4 }
initial_state = true
seed = 1

# varlen with an empty sequence
[[ops.delta_rule.case]]
id = "varlen"
dims = { B = 1, T = 6, H = 2, K = 4, V = 3 }
seqlens = [0, 4, 2]
seed = 2
"""

# The factor the planted implementation multiplies its output by: 1 is correct.
FACTOR = {"o": 1.0}


def planted_delta_rule(**kw):
    o, s = chunk_delta_rule_ref(**kw)
    return o * FACTOR["o"], s


@pytest.fixture
def planted():
    FACTOR["o"] = 1.0
    impl = register(Implementation(op="delta_rule", name="planted", kind="reference",
                                   target=planted_delta_rule), replace=True)
    yield impl
    unregister("delta_rule", "planted")


def write_suite(tmp_path: Path, text: str = TINY, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def invoke(tmp_path: Path, suite: Path, *extra: str):
    return runner.invoke(app, ["gate", "--suite", str(suite), "--device", "cpu",
                               "--out", str(tmp_path / "out"), *extra])


def report(tmp_path: Path, name: str = "tiny") -> dict:
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


def test_update_round_trips(tmp_path, planted):
    suite = write_suite(tmp_path)
    first = invoke(tmp_path, suite, "--update")
    assert first.exit_code == 0, first.output
    assert "created the tiny section" in first.output
    recorded = tmp_path / "baselines" / "cpu-interpret.json"
    text = recorded.read_text()
    data = json.loads(text)
    section = data["suites"]["tiny"]
    assert data["device_class"] == "cpu-interpret" and section["growth"] == baseline.GROWTH
    assert section["command"].startswith("harness gate --suite ") and "--update" in section["command"]
    keys = [run.entry_key(e) for e in section["entries"]]
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    assert {e["impl"] for e in section["entries"]} == {"chunk_ref", "planted"}
    assert {e["case"] for e in section["entries"]} == {"a", "varlen"}

    again = invoke(tmp_path, suite)
    assert again.exit_code == 0, again.output
    assert "gate tiny: passed" in again.output and "regressions 0" in again.output
    assert report(tmp_path)["passed"] is True

    second = invoke(tmp_path, suite, "--update")
    assert second.exit_code == 0 and "baseline unchanged" in second.output, second.output
    assert recorded.read_text() == text  # stable byte for byte


def test_planted_regression_fails_and_names_the_row(tmp_path, planted):
    suite = write_suite(tmp_path)
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    FACTOR["o"] = 1 + 1e-3
    result = invoke(tmp_path, suite)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "--update" in result.output
    rows = report(tmp_path)["rows"]
    bad = {(r["impl"], r["dtype"], r["case"], r["quantity"]) for r in rows if r["status"] == "regression"}
    assert ("planted", "float64", "a", "o") in bad and ("planted", "float32", "varlen", "o") in bad
    assert all(r["impl"] == "planted" for r in rows)  # chunk_ref is untouched
    assert "reproduce with:" in result.output and "harness check delta_rule --impl planted" in result.output
    md = (tmp_path / "out" / "tiny.md").read_text()
    assert "| regression | delta_rule | planted | float64 | a | o |" in md


def test_drift_the_check_tolerates_still_fails_the_gate(tmp_path, planted):
    """float32 errors of ~1e-7 growing to ~5e-7 pass harness check's tolerance (~1.3e-6)
    but not the gate: it compares with what this implementation did before."""
    suite = write_suite(tmp_path, TINY.replace('"float64", ', ""))
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    FACTOR["o"] = 1 + 5e-7
    result = invoke(tmp_path, suite)
    assert result.exit_code == 1, result.output
    rows = [r for r in report(tmp_path)["rows"] if r["status"] == "regression"]
    assert rows and all(r["reason"].startswith("grew ") for r in rows)
    assert ("planted", "a", "o") in {(r["impl"], r["case"], r["quantity"]) for r in rows}


def test_improvement_passes_and_is_reported(tmp_path, planted):
    suite = write_suite(tmp_path)
    FACTOR["o"] = 1 + 1e-3
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    FACTOR["o"] = 1 + 1e-5
    result = invoke(tmp_path, suite)
    assert result.exit_code == 0, result.output
    assert "improvement" in result.output
    rep = report(tmp_path)
    assert rep["summary"]["improvement"] > 0 and rep["summary"]["regression"] == 0
    changed = invoke(tmp_path, suite, "--update")
    assert changed.exit_code == 0 and "changed" in changed.output, changed.output


def test_nan_is_a_regression(tmp_path, planted):
    suite = write_suite(tmp_path)
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    FACTOR["o"] = math.nan
    result = invoke(tmp_path, suite)
    assert result.exit_code == 1, result.output
    reasons = [r["reason"] for r in report(tmp_path)["rows"] if r["status"] == "regression"]
    assert reasons and any("non-finite now" in r for r in reasons)


def test_measured_entry_now_skipped_is_a_regression(tmp_path, planted):
    suite = write_suite(tmp_path)
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    planted.available = lambda: "planted kernel disabled"
    result = invoke(tmp_path, suite)
    assert result.exit_code == 1, result.output
    rows = [r for r in report(tmp_path)["rows"] if r["status"] == "regression"]
    assert rows and all(r["impl"] == "planted" for r in rows)
    assert all("now skipped: planted kernel disabled" in r["reason"] for r in rows)


def test_vanished_implementation_is_a_regression(tmp_path):
    """With impls = "*", an implementation that is no longer registered fails the gate."""
    suite = write_suite(tmp_path, TINY.replace('["chunk_ref", "planted"]', '"*"')
                        .replace("delta_rule", "gla").replace("dims = { B = 1, T = 5", "gate = 8.0\ndims = { B = 1, T = 5"))
    register(Implementation(op="gla", name="planted", kind="reference", target=chunk_gla_ref),
             replace=True)
    try:
        assert invoke(tmp_path, suite, "--update").exit_code == 0
    finally:
        unregister("gla", "planted")
    result = invoke(tmp_path, suite)
    assert result.exit_code == 1, result.output
    rows = [r for r in report(tmp_path)["rows"] if r["status"] == "regression"]
    assert rows and {r["impl"] for r in rows} == {"planted"}
    assert all("gla/planted is not registered any more" in r["reason"] for r in rows)


def test_entries_not_in_the_baseline_fail(tmp_path, planted):
    suite = write_suite(tmp_path)
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    extra = TINY + '\n[[ops.delta_rule.case]]\nid = "b"\ndims = { B = 2, T = 3, H = 1, K = 4, V = 4 }\nseed = 3\n'
    suite.write_text(extra.replace("seed = 1\n", "seed = 11\n"))  # and case "a" changed
    result = invoke(tmp_path, suite)
    assert result.exit_code == 1, result.output
    rows = report(tmp_path)["rows"]
    assert rows and all(r["status"] == "new" for r in rows)
    assert {r["case"] for r in rows} == {"a", "b"}
    assert any("definition changed" in r["reason"] for r in rows if r["case"] == "a")
    assert "not in the baseline" in result.output and "--update" in result.output
    update = invoke(tmp_path, suite, "--update")
    assert "case changed" in update.output and "seed=1" in update.output and "seed=11" in update.output


def test_missing_baseline_says_how_to_create_it(tmp_path, planted):
    suite = write_suite(tmp_path)
    result = invoke(tmp_path, suite)
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "no baseline for device class cpu-interpret / suite tiny" in out
    assert f"harness gate --suite {suite} --device cpu --update" in out
    other = invoke(tmp_path, suite, "--device-class", "cuda-sm90")
    assert other.exit_code == 2 and "cuda-sm90" in other.output


def test_baseline_of_another_device_class_is_refused(tmp_path, planted):
    suite = write_suite(tmp_path)
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    src = tmp_path / "baselines" / "cpu-interpret.json"
    (tmp_path / "baselines" / "cuda-sm90.json").write_text(src.read_text())
    result = invoke(tmp_path, suite, "--device-class", "cuda-sm90")
    assert result.exit_code == 2 and "never shared across device classes" in result.output
    src.write_text("{not json")
    result = invoke(tmp_path, suite)
    assert result.exit_code == 2 and "malformed baseline" in result.output


def test_device_class(monkeypatch):
    import torch

    assert baseline.device_class("cpu") == "cpu-interpret"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert baseline.device_class("cuda") == "cuda-sm90"
    with pytest.raises(baseline.GateError, match="--device-class"):
        baseline.check_device_class("CUDA SM90")


BAD = [
    ("[ops.delta_rule\n", "malformed TOML"),
    ('[ops.deltanet]\ndtypes = ["float32"]\n', "unknown operator 'deltanet'"),
    ('[ops.delta_rule]\nimpls = ["chunky"]\ndtypes = ["float32"]\n', "unknown implementation 'chunky'"),
    ('[ops.delta_rule]\ndtypes = ["float8"]\n', "unknown dtype 'float8'"),
    ('[ops.delta_rule]\ndtypes = ["float32"]\n', "no cases"),
    ('[ops.delta_rule]\ndtypes = ["float32"]\n[[ops.delta_rule.case]]\nid = "a"\ndims = { B = 1, T = 4, H = 1, K = 4, V = 4 }\n',
     "missing key(s) 'seed'"),
    ('[ops.delta_rule]\ndtypes = ["float32"]\n[[ops.delta_rule.case]]\nid = "a"\nseed = 1\ndims = { B = 1, T = 4, H = 1, K = 4, V = 4 }\ncolour = 1\n',
     "unknown key(s) 'colour'"),
    ('[ops.delta_rule]\ndtypes = ["float32"]\n[[ops.delta_rule.case]]\nid = "a"\nseed = 1\ndims = { B = 1, T = 4, H = 1, K = 4 }\n',
     "'dims' lacks V"),
    ('[ops.delta_rule]\ndtypes = ["float32"]\n[[ops.delta_rule.case]]\nid = "a"\nseed = 1\nseqlens = [2, 1]\ndims = { B = 1, T = 4, H = 1, K = 4, V = 4 }\n',
     "sum to 3 but T=4"),
    ('[ops.delta_rule]\ndtypes = ["float32"]\n[[ops.delta_rule.case]]\nid = "a"\nseed = 1\ngate = 20.0\ndims = { B = 1, T = 4, H = 1, K = 4, V = 4 }\n',
     "delta_rule has no decay gates"),
    ('[ops.ttt]\ndtypes = ["float32"]\n[[ops.ttt.case]]\nid = "a"\nseed = 1\noptions = { chunk_size = 0 }\ndims = { B = 1, T = 4, H = 1, D = 4 }\n',
     "'chunk_size' must be a positive int"),
    ('[ops.log_linear_attn]\ndtypes = ["float32"]\n[[ops.log_linear_attn.case]]\nid = "a"\nseed = 1\ndims = { B = 1, T = 4, G = 2, H = 3, K = 4, V = 4 }\n',
     "multiple of the q/k groups"),
    ('[ops.delta_rule]\ndtypes = ["float32"]\n[[ops.delta_rule.case]]\nid = "a"\nseed = 1\ndims = { B = 1, T = 4, H = 1, K = 4, V = 4 }\n'
     '[[ops.delta_rule.long]]\nid = "a"\nlengths = [4]\nseed = 2\n', None),  # long ids get -T<n>: fine
    ('[ops.delta_rule]\ndtypes = ["float32"]\n[[ops.delta_rule.case]]\nid = "a"\nseed = 1\ndims = { B = 1, T = 4, H = 1, K = 4, V = 4 }\n'
     '[[ops.delta_rule.case]]\nid = "a"\nseed = 2\ndims = { B = 1, T = 4, H = 1, K = 4, V = 4 }\n', "used twice"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_invalid_suites_are_refused_with_a_clear_error(tmp_path, text, message):
    path = write_suite(tmp_path, text, "bad")
    if message is None:
        load_suite(path)
        return
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert message in str(info.value) and "bad.toml" in str(info.value)


def test_speed_baselines_cannot_be_gated(tmp_path):
    """An implementation of kind 'baseline' (softmax attention timed beside the kernels)
    computes other math: '*' leaves it out and naming it is an error."""
    if "baseline" not in KINDS:
        pytest.skip("the registry has no 'baseline' kind")
    register(Implementation(op="delta_rule", name="planted_sdpa", kind="baseline",
                            target=chunk_delta_rule_ref), replace=True)
    try:
        text = TINY.replace('["chunk_ref", "planted"]', '["chunk_ref", "planted_sdpa"]')
        with pytest.raises(SuiteError, match="planted_sdpa is a baseline: it computes other math"):
            load_suite(write_suite(tmp_path, text))
        suite = load_suite(write_suite(tmp_path, TINY.replace('["chunk_ref", "planted"]', '"*"')))
        impls, _ = run.chosen_impls(suite.cases[0], "cpu")
        assert "planted_sdpa" not in {i.name for i in impls} and "chunk_ref" in {i.name for i in impls}
    finally:
        unregister("delta_rule", "planted_sdpa")


def test_unknown_suite_is_a_usage_error():
    result = runner.invoke(app, ["gate", "--suite", "nosuch", "--device", "cpu"])
    assert result.exit_code == 2
    assert "unknown suite 'nosuch'" in result.output and "ci" in result.output


def test_gpu_suite_is_refused_on_the_cpu():
    result = runner.invoke(app, ["gate", "--suite", "gpu", "--device", "cpu"])
    assert result.exit_code == 2 and "runs on cuda only" in result.output


@pytest.mark.parametrize("name", available_suites())
def test_every_suite_loads_and_builds_its_cases(name):
    suite = load_suite(name)
    assert set(suite.ops) == {"delta_rule", "gla", "ttt", "titans", "log_linear_attn"}
    ids = [(c.op, c.id) for c in suite.cases]
    assert len(ids) == len(set(ids))
    for op in suite.ops:
        cases = [c.case for c in suite.cases if c.op == op]
        assert any(c.dims["T"] % 64 and c.dims["T"] > 64 for c in cases), op  # a tail chunk
        assert any(c.seqlens and 0 in c.seqlens for c in cases), op  # an empty sequence
        assert any(c.dims.get("K", c.dims.get("D")) & (c.dims.get("K", c.dims.get("D")) - 1)
                   for c in cases), op  # a head dim that is not a power of two
        if OPERATORS[op].gated:
            assert any(c.gate >= 20 for c in cases), op  # log gates to -60
        if op in ("ttt", "titans"):  # a partial last mini-batch
            assert any(c.dims["T"] % c.options["chunk_size"] for c in cases), op
        assert any(sc.family == "long" for sc in suite.cases if sc.op == op), op


def test_committed_cpu_baseline_matches_the_ci_suite():
    """Editing suites/ci.toml without rerunning --update fails here, before CI's gate does."""
    suite = load_suite("ci")
    data = baseline.read_baselines(SUITES_DIR / "baselines" / "cpu-interpret.json", "cpu-interpret")
    section = data["suites"]["ci"]
    assert section["cases"] == {f"{c.op}/{c.id}": json.loads(c.case.to_json()) for c in suite.cases}
    assert section["command"] == "harness gate --suite ci --update"


def test_parallel_jobs_give_the_same_entries_as_one_process(tmp_path):
    # Worker processes (spawned) load the suite and the built-in registry themselves; their
    # entries must be those of the one-process run, value for value, in the same case order.
    # Both with the CPU's math pinned (harness/gate/cpu_pins.py): the one-process run is a fresh
    # `harness gate` (pinned before it loads torch; this test's own process loaded it unpinned).
    suite_path = write_suite(tmp_path, TINY.replace('"planted"', '"naive"'))
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES")}
    done = subprocess.run([sys.executable, "-m", "harness", "gate", "--suite", str(suite_path),
                           "--device", "cpu", "--update", "--baselines", str(tmp_path / "one"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not pinned" not in done.stdout
    section = json.loads((tmp_path / "one" / "cpu-interpret.json").read_text())["suites"]["tiny"]
    assert "ATEN_CPU_CAPABILITY=default" in section["environment"]["cpu_pins"]
    one = {run.entry_key(e): e for e in section["entries"]}
    suite = load_suite(suite_path)
    two = run.run_suite(suite, "cpu", jobs=2)
    assert one and two.entries == one
    assert list(two.cases) == sorted(section["cases"]) and two.failures == {}
    assert set(two.seconds) == {"delta_rule"}


def test_cases_out_of_memory_beside_others_run_again_alone():
    # Results as _run_case gives them: (entries, failure, seconds). Only those that ran out of
    # a device's memory (in an entry's note, or the truth's failure) are evaluated again, each by
    # itself; the others keep their entries.
    oom = "RuntimeError: Triton Error [CUDA]: out of memory"
    results = [([{"error": 1e-7, "passed": True}], None, 1.0),
               ([{"error": None, "passed": False, "note": oom}, {"error": 2e-7}], None, 2.0),
               ([], "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 3.0),
               ([{"error": None, "passed": False, "note": "non-finite error"}], None, 4.0)]
    calls = []

    def alone(n):
        calls.append(n)
        return [{"error": 3e-7, "passed": True}], None, 5.0

    again, ran = run.again_alone([7, 3, 9, 4], results, alone)
    assert calls == ran == [3, 9]
    assert again == [results[0], alone(3), alone(9), results[3]]


def test_workers_take_the_largest_case_first():
    # On the H100 a delta-rule T = 65536 case, taken in suite order (last), held up a run that
    # was otherwise done: the largest case must be the first one handed to a worker.
    cases = [c for c in load_suite("gpu").cases if c.op == "delta_rule"]
    assert cases[-1].id == "long-T16384" and cases[0].id == "basic"
    order = sorted(cases, key=lambda c: -run.case_size(c))
    assert order[0].id == "stateless" and order[1].id in ("basic", "long-T16384")
    assert [run.case_size(c) for c in order] == sorted(map(run.case_size, cases), reverse=True)


TWO_OPS = TINY + """
[ops.gla]
impls = ["chunk_ref"]
dtypes = ["float64"]

[[ops.gla.case]]
id = "g"
dims = { B = 1, T = 5, H = 1, K = 4, V = 4 }
seed = 3
"""


def test_op_restricts_the_run_and_the_comparison(tmp_path, planted):
    suite = write_suite(tmp_path, TWO_OPS)
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    FACTOR["o"] = 1 + 1e-3  # a delta-rule regression: invisible to a gla-only run
    only_gla = invoke(tmp_path, suite, "--op", "gla")
    assert only_gla.exit_code == 0, only_gla.output
    assert "1 cases" in only_gla.output and "gate tiny: passed" in only_gla.output
    summary = report(tmp_path)["summary"]  # delta_rule's entries are not reported missing
    assert summary["regression"] == 0 and summary["new"] == 0 and summary["ok"] > 0
    assert invoke(tmp_path, suite, "--op", "delta_rule").exit_code == 1
    bad = invoke(tmp_path, suite, "--op", "ttt")
    assert bad.exit_code == 2 and "has no cases of ttt" in bad.output


def test_op_update_replaces_that_operator_and_keeps_the_others(tmp_path, planted):
    suite = write_suite(tmp_path, TWO_OPS)
    assert invoke(tmp_path, suite, "--update").exit_code == 0
    baseline = tmp_path / "baselines" / "cpu-interpret.json"
    before = json.loads(baseline.read_text())["suites"]["tiny"]
    FACTOR["o"] = 2.0
    result = invoke(tmp_path, suite, "--op", "delta_rule", "--update")
    assert result.exit_code == 0 and "kept" in result.output, result.output
    after = json.loads(baseline.read_text())["suites"]["tiny"]
    assert after["command"] == before["command"]  # the section's own command stays
    assert "--op delta_rule" in after["op_updates"]["delta_rule"]["command"]
    assert "gla" not in after["op_updates"]
    gla = [e for e in before["entries"] if e["op"] == "gla"]
    assert gla and [e for e in after["entries"] if e["op"] == "gla"] == gla
    assert after["cases"] == before["cases"]
    planted_o = {(e["dtype"], e["case"]): e["error"] for e in after["entries"]
                 if e["impl"] == "planted" and e["quantity"] == "o"}
    assert planted_o and all(err > 0.5 for err in planted_o.values())  # re-recorded at 2x
    assert invoke(tmp_path, suite).exit_code == 0  # the merged section gates the whole suite


def test_an_entry_without_a_finite_error_shows_why():
    from harness.gate.report import show_entry

    base = {"op": "ttt", "impl": "chunk", "dtype": "float32", "case": "c", "quantity": "o"}
    nan = {**base, "error": None, "passed": False, "note": "non-finite error"}
    assert show_entry(nan) == "non-finite (fails tol)"
    crash = {**nan, "note": "OutOfResources: out of resource: shared memory"}
    assert show_entry(crash) == ("no finite error: OutOfResources: out of resource: shared memory"
                                 " (fails tol)")
    assert show_entry({**base, "error": 0.00123, "passed": True}) == "0.00123"
