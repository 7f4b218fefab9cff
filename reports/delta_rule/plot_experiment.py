"""Plot experiment.py's bench rows (its bench.json) with the harness's plotter: time against T,
one line per implementation, fwd and fwd+bwd panels.

    python3 reports/delta_rule/plot_experiment.py BENCH_JSON OUT_DIR [DEVICE] [old=new ...]

old=new renames an implementation (e.g. chunk_round=chunk: a variant that became the default).
Memory is left out: pass only rows whose peaks mean what the plot would say."""
import json
import sys
from pathlib import Path

import pandas as pd

from harness.bench_report import plot

rows = json.loads(Path(sys.argv[1]).read_text())
device = sys.argv[3] if len(sys.argv) > 3 else "GPU"
names = dict(a.split("=") for a in sys.argv[4:])
df = pd.DataFrame(rows).rename(columns={"p20": "ms_p20", "p80": "ms_p80"})
df["impl"] = df["impl"].map(lambda n: names.get(n, n))
df = df.assign(op="delta_rule", dtype="bfloat16", status="ok", B=2, H=16, D=128,
               device_name=device, peak_mb=float("nan"))
out = Path(sys.argv[2])
for path in plot(df, out):
    print(path)
