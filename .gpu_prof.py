import torch, sys
from torch.profiler import profile, ProfilerActivity
from harness.registry import get
from harness.bench import bench_case, make_call
T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
case = bench_case("delta_rule", 2, T, 16, 128)
for name in sys.argv[2].split(",") if len(sys.argv) > 2 else ["chunk"]:
    for mode in ["fwd", "fwdbwd"]:
        if "fused" in name and mode == "fwdbwd": continue
        step = make_call(get("delta_rule", name), case, "bfloat16", mode)
        for _ in range(3): step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): step()
            torch.cuda.synchronize()
        print(f"===== {name} {mode} T={T} (5 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
