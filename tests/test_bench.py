"""`harness bench` and `harness report` on the CPU: crash isolation (a planted segfault and a
planted hang each become one row), resume, torchrun sharding (gloo, two processes), the
writers, and the peers/baselines the sweep compares."""

import re
import json
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from harness.bench.report import derive, frame, pivot, plot, write_report, write_tables
from harness.cli import app
from harness.registry import get, unregister
from harness.bench.sweep import read_rows

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
PLANTED = ("planted_segfault", "planted_hang", "planted_raise")
TINY = ["--batch", "1", "--heads", "1", "--head-dim", "8", "--mode", "fwd", "--warmup", "0",
        "--rep", "5", "--device", "cpu"]


@pytest.fixture
def planted(tmp_path):
    """A plugin file registering three delta rule implementations that fail in three ways;
    unregistered afterwards so no other test picks them up."""
    path = tmp_path / "planted.py"
    path.write_text(textwrap.dedent("""
        import os, signal, time
        from harness.registry import Implementation, register

        def segfault(**kwargs):
            os.kill(os.getpid(), signal.SIGSEGV)

        def hang(**kwargs):
            time.sleep(3600)

        def raise_oom(**kwargs):
            raise RuntimeError("CUDA out of memory (planted)")

        def register_all():
            for name, fn in (("planted_segfault", segfault), ("planted_hang", hang),
                             ("planted_raise", raise_oom)):
                register(Implementation(op="delta_rule", name=name, kind="peer", target=fn,
                                        devices=("cpu", "cuda"), dtypes=("float32",),
                                        description="planted failure"), replace=True)
    """))
    yield path
    for name in PLANTED:
        unregister("delta_rule", name)


def harness_cli(args, cwd, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def by_impl(rows):
    return {(r["impl"], r["T"]): r for r in rows}


# ---------------------------------------------------------------- crash isolation
def test_segfault_and_hang_cost_one_row_each(tmp_path, planted):
    out = tmp_path / "out"
    res = harness_cli(["harness", "bench", "delta_rule", "--impl",
                       "naive,planted_segfault,planted_hang,chunk_ref", "--seq-len", "16",
                       "--timeout", "4", "--plugin", str(planted), "--out", str(out), *TINY],
                      tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = by_impl(read_rows(out))
    assert [r["status"] for r in read_rows(out)] == ["ok", "failed", "timeout", "ok"]
    seg = rows[("planted_segfault", 16)]
    assert "worker killed by SIGSEGV (exit code -11)" in seg["reason"]
    assert "Segmentation fault" in seg["reason"]  # faulthandler's report, from the worker log
    assert "no result after 4 s (worker killed)" in rows[("planted_hang", 16)]["reason"]
    assert rows[("chunk_ref", 16)]["ms"] > 0 and rows[("naive", 16)]["ms"] > 0
    df = pd.read_csv(out / "bench.csv")
    assert list(df["status"]) == ["ok", "failed", "timeout", "ok"]
    assert "2 row(s) failed" in res.stdout and "SIGSEGV" in res.stdout


def test_exception_is_a_failed_row_and_resume_skips_done_rows(tmp_path, planted):
    out = tmp_path / "out"
    first = runner.invoke(app, ["bench", "delta_rule", "--impl", "naive,planted_raise",
                                "--seq-len", "16", "--no-isolate", "--plugin", str(planted),
                                "--out", str(out), *TINY])
    assert first.exit_code == 0, first.output
    rows1 = by_impl(read_rows(out))
    assert rows1[("planted_raise", 16)]["status"] == "failed"
    assert rows1[("planted_raise", 16)]["reason"] == "RuntimeError: CUDA out of memory (planted)"

    second = runner.invoke(app, ["bench", "delta_rule", "--impl", "naive,planted_raise",
                                 "--seq-len", "16,32", "--no-isolate", "--resume",
                                 "--plugin", str(planted), "--out", str(out), *TINY])
    assert second.exit_code == 0, second.output
    lines = read_rows(out)
    # run 1 wrote 2 rows; run 2 re-ran the failed one and measured T=32: 3 more, not 4
    assert len(lines) == 5
    assert [(r["impl"], r["T"]) for r in lines[2:]] == [
        ("planted_raise", 16), ("naive", 32), ("planted_raise", 32)]
    rows2 = by_impl(lines)
    assert rows2[("naive", 16)] == rows1[("naive", 16)]  # kept, not measured again
    assert len(pd.read_csv(out / "bench.csv")) == 4  # one line per key
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["commands"]) == 2 and "--resume" in meta["commands"][1]

    third = runner.invoke(app, ["bench", "delta_rule", "--impl", "naive,chunk_ref", "--seq-len",
                                "16", "--no-isolate", "--max-time", "1e-9", "--out", str(out), *TINY])
    assert third.exit_code == 0, third.output
    assert read_rows(out) == []  # without --resume: afresh, the old rows set aside
    assert len((out / "previous" / "rows.jsonl").read_text().splitlines()) == 5
    assert "--max-time 1e-09 s reached: 2 row(s) not started" in third.output
    fourth = runner.invoke(app, ["bench", "delta_rule", "--impl", "naive,chunk_ref", "--seq-len",
                                 "16", "--no-isolate", "--resume", "--out", str(out), *TINY])
    assert fourth.exit_code == 0, fourth.output
    assert [(r["impl"], r["status"]) for r in read_rows(out)] == [("naive", "ok"), ("chunk_ref", "ok")]


# ---------------------------------------------------------------- prewarm
def test_prewarm_jobs_take_each_implementation_and_mode_once_at_its_smallest_T():
    from harness.bench.prewarm import jobs

    def row(impl, T, mode="fwd", status=None):
        r = dict(op="delta_rule", impl=impl, dtype="float32", mode=mode, B=1, T=T, H=2, D=16)
        return r if status is None else {**r, "status": status}
    rows = [row("a", 64), row("a", 32), row("a", 64, "fwdbwd"), row("b", 16, status="skipped"),
            row("b", 128)]
    assert [(j["impl"], j["mode"], j["T"]) for j in jobs(rows)] == [
        ("a", "fwd", 32), ("a", "fwdbwd", 64), ("b", "fwd", 128)]
    assert set(jobs(rows)[0]) == {"op", "impl", "dtype", "mode", "B", "T", "H", "D"}


def test_prewarm_runs_each_job_in_its_own_process_before_the_rows(tmp_path, planted):
    # a planted implementation that records each call (pid, T, the autotune-cache setting):
    # the prewarm job calls it once at the smallest T, in another process than the timing
    # worker, with autotune results not cached; a job that segfaults costs only a note, and
    # its row is measured (and fails) as usual
    marker = tmp_path / "calls.txt"
    plugin = tmp_path / "recorder.py"
    plugin.write_text(textwrap.dedent(f"""
        import os
        from harness.registry import Implementation, register
        from references.delta_rule import naive_recurrent_delta_rule

        def recorded(**kwargs):
            with open({str(marker)!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{kwargs['q'].shape[1]}} "
                        f"{{os.environ.get('TRITON_CACHE_AUTOTUNING')}} "
                        f"{{os.environ.get('FLA_CACHE_RESULTS')}}\\n")
            return naive_recurrent_delta_rule(**kwargs)

        def register_all():
            register(Implementation(op="delta_rule", name="recorded", kind="peer", target=recorded,
                                    devices=("cpu",), dtypes=("float32",),
                                    description="records its calls"), replace=True)
    """))
    out = tmp_path / "out"
    try:
        res = harness_cli(["harness", "bench", "delta_rule", "--impl", "recorded,planted_segfault",
                           "--seq-len", "16,8", "--prewarm", "2", "--timeout", "60",
                           "--plugin", str(plugin), "--plugin", str(planted), "--out", str(out),
                           *TINY], tmp_path)
    finally:
        unregister("delta_rule", "recorded")
    assert res.returncode == 0, res.stdout + res.stderr
    calls = [line.split() for line in marker.read_text().splitlines()]
    # the prewarm job: smallest T, autotune results not cached (Triton's setting and fla's)
    assert calls[0][1:] == ["8", "0", "0"]
    rows_calls = calls[1:]  # the timed rows: in the worker, another process, T = 16 first
    assert calls[0][0] not in {c[0] for c in rows_calls} and rows_calls[0][1] == "16"
    assert {tuple(c[2:]) for c in rows_calls} == {("None", "None")}
    assert "prewarm delta_rule recorded float32 fwd T=8: ok" in res.stdout
    # a failed job says why on its own line (a run cut off before the summary keeps it)
    assert re.search(r"prewarm delta_rule planted_segfault float32 fwd T=8: failed in [\d.]+ s: "
                     r".*(Segmentation|SIG)", res.stdout), res.stdout
    assert "prewarmed 2 job(s)" in res.stdout and "1 did not finish" in res.stdout
    statuses = {(r["impl"], r["T"]): r["status"] for r in read_rows(out)}
    assert statuses == {("recorded", 16): "ok", ("recorded", 8): "ok",
                        ("planted_segfault", 16): "failed", ("planted_segfault", 8): "failed"}


# ---------------------------------------------------------------- torchrun
def test_torchrun_shards_rows_and_rank0_gathers_them_once(tmp_path):
    out = tmp_path / "out"
    res = harness_cli(["torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "-m", "harness", "bench", "delta_rule", "gla", "--impl", "naive,chunk_ref",
                       "--seq-len", "16,32", "--no-isolate", "--out", str(out), *TINY], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    df = pd.read_csv(out / "bench.csv")
    keys = list(zip(df["op"], df["impl"], df["T"]))
    assert len(keys) == 8 and len(set(keys)) == 8 and (df["status"] == "ok").all()
    assert sorted(df["rank"].unique()) == [0, 1]
    for rank in (0, 1):  # each rank appended its own share, rows i % 2 == rank
        assert len((out / f"rows.rank{rank}.jsonl").read_text().splitlines()) == 4
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert meta["commands"][0].startswith("torchrun --nproc-per-node=2 -m harness bench")


# ---------------------------------------------------------------- q/k groups
def test_groups_set_the_grouped_operators_G_and_nothing_else(tmp_path):
    """--groups 1 with H = 2: log-linear attention's rows carry G = 1 and read half the q/k
    bytes of G = H; the delta rule, which has no groups, is unchanged."""
    common = ["--seq-len", "16", "--no-isolate", "--batch", "1", "--heads", "2", "--head-dim",
              "8", "--mode", "fwd", "--warmup", "0", "--rep", "5", "--device", "cpu"]
    frames = {}
    for name, extra in (("grouped", ["--groups", "1"]), ("plain", [])):
        res = runner.invoke(app, ["bench", "log_linear_attn", "delta_rule", "--impl",
                                  "chunk_ref", "--out", str(tmp_path / name), *common, *extra])
        assert res.exit_code == 0, res.output
        frames[name] = pd.read_csv(tmp_path / name / "bench.csv").set_index("op")
    grouped, plain = frames["grouped"], frames["plain"]
    assert grouped.loc["log_linear_attn", "G"] == 1 and grouped["G"].isna()["delta_rule"]
    assert grouped.loc["log_linear_attn", "bytes"] < plain.loc["log_linear_attn", "bytes"]
    assert grouped.loc["delta_rule", "bytes"] == plain.loc["delta_rule", "bytes"]
    bad = runner.invoke(app, ["bench", "log_linear_attn", "--groups", "3", *common])
    assert bad.exit_code != 0 and "--groups: expected a divisor of H = 2, got 3" in bad.output


# ---------------------------------------------------------------- a real CPU run, then report
def test_cpu_run_of_a_triton_kernel_against_the_sdpa_baseline(tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["bench", "delta_rule", "--impl", "chunk", "--baseline", "sdpa",
                              "--seq-len", "64", "--no-isolate", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    assert "timings on CPU (Triton interpreter) are not meaningful" in res.output
    assert "speedup over sdpa" in res.output
    df = pd.read_csv(out / "bench.csv")
    assert list(df["impl"]) == ["chunk", "sdpa"] and (df["status"] == "ok").all()
    assert df["peak_mb"].isna().all()  # no memory on the CPU
    assert (df["tflops"] > 0).all() and (df["pct_matmul"] > 0).all()
    assert df.loc[df["impl"] == "sdpa", "speedup"].item() == 1.0
    ceilings = json.loads((out / "ceilings.json").read_text())
    (name, c), = ceilings.items()
    assert name.startswith("cpu") and c["meaningful"] is False and c["matmul_tflops"] > 0
    assert (out / "delta_rule_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rep = runner.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0, rep.output
    md = (out / "report.md").read_text()
    assert "harness bench delta_rule --impl chunk --seq-len 64" in md
    assert "![delta_rule_time.png](delta_rule_time.png)" in md
    assert "not meaningful" in md and "Speedup over `sdpa`" in md
    assert "<img src='delta_rule_speedup.png'" in (out / "report.html").read_text()
    again = runner.invoke(app, ["report", str(out), "--baseline", "chunk"])
    assert again.exit_code == 0, again.output
    assert "Speedup over `chunk`" in (out / "report.md").read_text()
    bad = runner.invoke(app, ["report", str(out), "--baseline", "nope"])
    assert bad.exit_code == 2 and "--baseline" in bad.output and "chunk, sdpa" in bad.output


# ---------------------------------------------------------------- derived columns and writers
def _row(impl, T, ms, status="ok", mode="fwd", **extra):
    return dict(op="gla", impl=impl, dtype="float32", mode=mode, B=1, T=T, H=2, D=16,
                kind="baseline" if impl == "sdpa" else "triton", status=status, ms=ms,
                ms_p20=ms * 0.9 if ms else None, ms_p80=ms * 1.1 if ms else None,
                peak_mb=ms * 10 if ms else None, device="cuda", device_name="Fake GPU",
                **extra)


ROWS = [_row("chunk", 128, 2.0), _row("sdpa", 128, 4.0), _row("chunk", 256, 3.0),
        _row("sdpa", 256, 12.0), _row("recurrent", 128, None, "failed", reason="boom | x"),
        _row("recurrent", 256, None, "timeout", reason="no result after 4 s"),
        _row("chunk", 128, None, "skipped", mode="bwd", reason="no backward")]
CEILINGS = {"Fake GPU": {"matmul_tflops": 1e-3, "copy_gbps": 1.0, "matmul": "m", "copy": "c",
                         "meaningful": True}}


def test_derived_columns():
    df = derive(frame(ROWS), CEILINGS, "sdpa")
    chunk = df[(df["impl"] == "chunk") & (df["T"] == 128) & (df["mode"] == "fwd")].iloc[0]
    # gla B=1 T=128 H=2 K=V=16: 2*128*(2*64*16*2 + 4*256) FLOPs, 4*256*64 + 4*256*16 bytes
    assert chunk["flops"] == 1_310_720 and chunk["bytes"] == 81_920
    assert chunk["tflops"] == pytest.approx(1_310_720 / 2e-3 / 1e12)
    assert chunk["gbps"] == pytest.approx(81_920 / 2e-3 / 1e9)
    assert chunk["tokens_per_s"] == pytest.approx(128 / 2e-3)
    assert chunk["pct_matmul"] == pytest.approx(100 * chunk["tflops"] / 1e-3)
    assert chunk["pct_copy"] == pytest.approx(100 * chunk["gbps"] / 1.0)
    assert chunk["speedup"] == 2.0
    assert df[(df["impl"] == "chunk") & (df["T"] == 256)]["speedup"].item() == 4.0
    sdpa = df[(df["impl"] == "sdpa") & (df["T"] == 128)].iloc[0]
    assert sdpa["flops"] == 2 * 128 * 128 * 32  # the baseline by its own model
    failed = df[df["status"] != "ok"]
    assert failed["tflops"].isna().all() and failed["speedup"].isna().all()


def test_pivot_marks_failed_timeout_and_skipped_rows():
    table = pivot(derive(frame(ROWS), CEILINGS, "sdpa"))
    assert list(table.columns) == ["op", "mode", "T", "chunk", "sdpa", "recurrent"]
    fwd = table[table["mode"] == "fwd"].set_index("T")
    assert fwd.loc[128, "chunk"] == "2.000" and fwd.loc[256, "sdpa"] == "12.000"
    assert fwd.loc[128, "recurrent"] == "failed" and fwd.loc[256, "recurrent"] == "timeout"
    assert table[table["mode"] == "bwd"]["chunk"].item() == "-"


def test_printed_table_names_a_switch_form():
    """A variant's column "chunk[LABEL]" (bench --set) is printed as named, not taken for rich
    markup (which drops "[LABEL]" and leaves two columns both called "chunk")."""
    from rich.console import Console

    from harness.bench.report import print_pivot

    console = Console(record=True, width=120)
    rows = [{**r, "impl": "chunk[w2]"} for r in ROWS if r["impl"] == "chunk"]
    print_pivot(console, pivot(derive(frame(ROWS + rows), CEILINGS, "sdpa")), "ms")
    assert "chunk[w2]" in console.export_text()


def test_writers_and_report(tmp_path):
    df = derive(frame(ROWS), CEILINGS, "sdpa")
    csv, js = write_tables(df, tmp_path, {"baseline": "sdpa"}, CEILINGS)
    back = pd.read_csv(csv)
    assert len(back) == len(ROWS)
    for col in ("op", "impl", "T", "mode", "status", "reason", "ms", "ms_p20", "ms_p80",
                "peak_mb", "tokens_per_s", "tflops", "gbps", "pct_matmul", "pct_copy", "speedup"):
        assert col in back.columns
    data = json.loads(js.read_text())
    assert data["meta"]["baseline"] == "sdpa" and len(data["rows"]) == len(ROWS)
    assert data["ceilings"]["Fake GPU"]["copy_gbps"] == 1.0
    paths = plot(df, tmp_path, "sdpa")
    assert [p.name for p in paths] == ["gla_time.png", "gla_memory.png", "gla_speedup.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    written = write_report(tmp_path, ROWS, {"baseline": "sdpa", "commands": ["harness bench gla"]},
                           CEILINGS)
    md = (tmp_path / "report.md").read_text()
    assert "```\nharness bench gla\n```" in md
    assert "| gla | fwd | 128 | 2.000 | 4.000 | failed |" in md
    assert "boom \\| x" in md  # a reason's pipe does not break the table
    assert "![gla_memory.png](gla_memory.png)" in md
    page = (tmp_path / "report.html").read_text()
    assert "<img src='gla_time.png'" in page and "<pre>harness bench gla</pre>" in page
    assert {p.name for p in written} >= {"report.md", "report.html", "bench.csv"}


def test_beside_plot_folds_operators_into_one_figure(tmp_path):
    """tools/beside_plot.py: two operators' rows drawn on one figure per quantity, each line
    labelled with its operator; rows of two head sizes refused."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "beside_plot.py"
    spec = importlib.util.spec_from_file_location("beside_plot", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    df = derive(frame(ROWS), CEILINGS, None)
    df = df.assign(finished=range(len(df)))  # bench.csv's time each row finished
    both = pd.concat([df, df.assign(op="ttt")], ignore_index=True)
    folded = tool.fold(both, "gla-ttt")
    assert set(folded["op"]) == {"gla-ttt"}
    assert set(folded["impl"]) == {f"{op} {impl}" for op in ("gla", "ttt")
                                   for impl in set(df["impl"])}
    assert [p.name for p in plot(folded, tmp_path)] == ["gla-ttt_time.png", "gla-ttt_memory.png"]
    with pytest.raises(ValueError, match="one B, H, D"):
        tool.fold(pd.concat([df, df.assign(D=df["D"] * 2)]), "x")
    # a row timed again in a later run replaces the earlier one; rows timed once stay
    again = df.iloc[:1].assign(ms=df["ms"].iloc[0] + 100, finished=df["finished"].max() + 1)
    folded = tool.fold(pd.concat([again, df], ignore_index=True), "x")
    assert len(folded) == len(df)
    assert folded["ms"].tolist().count(again["ms"].iloc[0]) == 1
    assert set(folded["ms"].dropna()) - set(df["ms"].dropna()) == {again["ms"].iloc[0]}


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("args, words", [
    (["mamba"], ["unknown operator 'mamba'", "or all"]),
    (["gla", "--seq-len", "64,abc"], ["--seq-len", "positive integers", "'64,abc'"]),
    (["gla", "--seq-len", "0"], ["--seq-len", "'0'"]),
    (["gla", "--mode", "sideways"], ["--mode", "fwd, bwd, fwdbwd", "'sideways'"]),
    (["gla", "--dtype", "int8"], ["--dtype", "float64", "'int8'"]),
    (["gla", "--impl", "nope"], ["--impl", "unknown implementation 'nope'", "chunk_ref"]),
    (["gla", "--baseline", "nope"], ["--baseline", "unknown implementation 'nope'"]),
    (["gla", "--impl", "fla_chunk"], ["gla/fla_chunk is not available on cpu"]),
    (["gla", "--timeout", "0"], ["--timeout", "positive"]),
    (["gla", "--max-time", "-5"], ["--max-time", "positive seconds", "-5"]),
    (["gla", "--prewarm", "-1"], ["--prewarm", ">= 0", "-1"]),
    (["gla", "--batch", "0"], ["--batch", "positive integer", "got 0"]),
    (["gla", "--plugin", "no_such_module_xyz"], ["--plugin", "no_such_module_xyz"]),
])
def test_bad_options_exit_2_naming_the_option(args, words, tmp_path):
    result = runner.invoke(app, ["bench", *args, "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output


def test_report_needs_a_bench_directory(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "OUT_DIR" in result.output
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no rows" in result.output


# ---------------------------------------------------------------- baselines and peers
def causal_softmax(q, k, v, scale):
    T = q.shape[1]
    s = torch.einsum("bthk,bshk->bhts", q, k) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("bhts,bshv->bthv", s.softmax(-1), v)


def test_sdpa_baseline_is_causal_softmax_attention_on_our_layout():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 7, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v, beta = torch.randn(2, 7, 3, 5, generator=gen, dtype=torch.float64), torch.rand(2, 7, 3)
    o, state = get("delta_rule", "sdpa")(q=q, k=k, v=v, beta=beta, scale=None)
    assert state is None
    assert torch.allclose(o, causal_softmax(q, k, v, 8**-0.5), rtol=0, atol=1e-12)
    out = get("ttt", "sdpa")(q=q, k=k, v=v[..., :1].expand(2, 7, 3, 8), scale=0.5)
    assert len(out) == 3 and out[1] is None and out[2] is None
    # log-linear's grouped q/k: G=1 group shared by H=3 value heads, scale 1.0 by default there
    qg, kg = q[:, :, :1], k[:, :, :1]
    o, _ = get("log_linear_attn", "sdpa")(q=qg, k=kg, v=v, g=None, level_scales=None, scale=1.0)
    assert torch.allclose(o, causal_softmax(qg.expand_as(q), kg.expand_as(k), v, 1.0),
                          rtol=0, atol=1e-12)


def test_check_leaves_baselines_out_and_list_shows_them():
    result = runner.invoke(app, ["check", "gla", "--impl", "sdpa", "--device", "cpu"])
    assert result.exit_code == 2
    assert "gla/sdpa is a baseline" in result.output and "harness bench" in result.output
    listed = runner.invoke(app, ["list", "--device", "cpu"])
    assert listed.exit_code == 0
    assert any("sdpa" in line and "baseline" in line for line in listed.output.splitlines())


@pytest.fixture
def fake_fla(monkeypatch):
    """Stand-ins for fla's modules (its kernels need CUDA): our references behind fla's
    function names and argument lists, so the adapters' argument mapping can be checked."""
    from references.gla import naive_recurrent_gla

    calls = []

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                  state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None):
        calls.append("chunk_gla")
        return naive_recurrent_gla(q, k, v, gk=g, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    modules = {name: types.ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.gla")}
    modules["fla.ops.gla"].chunk_gla = chunk_gla
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_fla_chunk_gla_adapter_maps_gk_to_g(fake_fla):
    from references.gla import naive_recurrent_gla

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    gk = -torch.rand(1, 9, 2, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    impl = get("gla", "fla_chunk")
    o, ht = impl.load()(q=q, k=k, v=v, gk=gk, gv=None, scale=0.3, initial_state=h0,
                        output_final_state=True, reverse=False, cu_seqlens=None)
    ref_o, ref_ht = naive_recurrent_gla(q, k, v, gk=gk, scale=0.3, initial_state=h0,
                                        output_final_state=True)
    assert fake_fla == ["chunk_gla"]
    assert torch.equal(o, ref_o) and torch.equal(ht, ref_ht)
    with pytest.raises(ValueError, match="takes no gv and no reverse; got gk=tensor, gv=None, reverse=True"):
        impl.load()(q=q, k=k, v=v, gk=gk, reverse=True)


@pytest.mark.parametrize("op, name, case_changes, reason", [
    ("gla", "fla_chunk", {"options": {"gv": True}}, "no value-side gate gv"),
    ("gla", "fla_chunk", {"options": {"reverse": True}}, "no reverse"),
    ("gla", "fla_chunk", {}, None),
    ("ttt", "fla_chunk", {"options": {"chunk_size": 8}}, "chunk_size=8"),
    ("ttt", "fla_fused_chunk", {"dims": {"D": 256}}, "D > 128"),
    ("ttt", "fla_chunk", {"seqlens": [10, 6]}, "no backward for cu_seqlens"),
    ("ttt", "fla_chunk", {}, None),
    ("log_linear_attn", "fla_chunk", {"dims": {"K": 48}}, "K % 64 == 0"),
    ("log_linear_attn", "fla_chunk", {"dims": {"V": 96}}, "V=96"),
    ("log_linear_attn", "fla_chunk", {}, None),
    ("delta_rule", "fla_parallel", {"dims": {"K": 256}}, "K > 128"),
    ("delta_rule", "fla_parallel", {"output_final_state": True}, "no initial/final state"),
    ("delta_rule", "fla_chunk", {"options": {"beta_per_channel": True}}, "per-channel beta"),
])
def test_fla_peers_decline_what_fla_cannot_do(op, name, case_changes, reason):
    from dataclasses import replace

    from harness.bench.measure import bench_case

    case = bench_case(op, 1, 16, 2, 64)
    changes = dict(case_changes)
    if "dims" in changes:
        changes["dims"] = {**case.dims, **changes["dims"]}
    if "options" in changes:
        changes["options"] = {**case.options, **changes["options"]}
    impl = get(op, name)
    assert impl.kind == "peer" and impl.devices == ("cuda",)
    why = impl.supports(replace(case, **changes))
    assert (why is None) if reason is None else (reason in why), why


def test_fla_titans_is_not_registered():
    with pytest.raises(KeyError, match="unknown implementation 'fla_chunk' of titans"):
        get("titans", "fla_chunk")


SLOW_PLUGIN = '''
import os
import time
from harness.registry import Implementation, register
from references.gla import chunk_gla_ref

SLOW = False  # a switch: 20 ms more a call


def gla(**kw):
    with open(os.environ["SLOW_PLUGIN_LOG"], "a") as log:  # what each call saw
        log.write(f"{SLOW}\\n")
    if SLOW:
        time.sleep(0.02)
    return chunk_gla_ref(**kw)


def register_all():
    register(Implementation(op="gla", name="switchable", kind="triton", target=gla),
             replace=True)
'''


def test_set_times_a_kernel_under_a_switch_form_in_its_workers(tmp_path, monkeypatch):
    """`bench --set 'LABEL:module.NAME=VALUE'` times NAME[LABEL] beside NAME, the constant set
    through its timed steps in its worker process (here: 20 ms of sleep a call): NAME[LABEL]'s
    median is 20 ms at least, and every call of either form saw its own value (the calls'
    log). NAME's time is not compared with it: on a loaded machine NAME's median was 160 ms
    against NAME[LABEL]'s 21.6."""
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("SLOW_PLUGIN_LOG", str(calls))
    out = tmp_path / "out"
    try:
        res = runner.invoke(app, ["bench", "gla", "--impl", "switchable", "--plugin",
                                  "slow_plugin", "--set", "slow:slow_plugin.SLOW=True",
                                  "--seq-len", "64", "--mode", "fwd", "--out", str(out), *TINY])
    finally:  # later tests choose every registered implementation; the workers know neither
        for name in ("switchable", "switchable[slow]"):
            unregister("gla", name)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "bench.csv").set_index("impl")
    assert (df["status"] == "ok").all()
    assert df.loc["switchable[slow]", "ms"] >= 20
    seen = calls.read_text().split()  # NAME's calls, then NAME[LABEL]'s
    first = seen.index("True")
    assert first > 0 and set(seen[:first]) == {"False"} and set(seen[first:]) == {"True"}, seen
    meta = json.loads((out / "meta.json").read_text())
    assert "--set slow:slow_plugin.SLOW=True" in meta["commands"][-1]
