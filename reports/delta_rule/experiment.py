"""GPU experiment: accuracy and speed of our delta rule kernels beside fla-core 0.6.0, in one call.

    PYTHONPATH=/tmp/site:$PWD python3 reports/delta_rule/experiment.py WHAT IMPLS [T,...]

WHAT: any of warm (compile only: run one process per implementation in parallel first), acc (bf16 errors vs the float64 recurrence, B=2 T=1000 H=4 D=64; ACC_DTYPES to
add float32), bench (median ms and peak MB, B=2 H=16 D=128 bf16; D=BENCH_D), prof (per-kernel time of
fwd+bwd at the last T), cfg (autotune choices). IMPLS: chunk, chunk_fused (FUSED_WY_FWD on),
chunk[_fused]_{split,tf32,round} (chunk_state.FWD_MIXED), chunk_bwdfwd (chunk.BWD_RECOMPUTE =
"forward"), chunk_dk32 (chunk.DK_PARTIAL_FLOAT32 = True), chunk_bwdfwd_dk32 (both: the defaults
before session d), chunk_fusedo (chunk.FUSED_OUTPUT), fla_chunk, fused_recurrent, fla_fused_recurrent, and any EXTRA="name=module:
function,..." (e.g. an old version of a kernel file, to time it beside the new one). Uses
kernels/ and references/ only, so it runs even while the harness is being changed. Compiles are the cost on a cold machine: time
few implementations and one shape per call."""
import json, os, sys, time
import torch, triton
from triton.testing import do_bench
from kernels.delta_rule.chunk import chunk_delta_rule
from kernels.delta_rule.fused_recurrent import fused_recurrent_delta_rule
from references.delta_rule import naive_recurrent_delta_rule, chunk_delta_rule_ref
import fla.ops.delta_rule as fdr

OUT = os.environ.get("OUT", "/tmp")
import kernels.delta_rule.chunk as chunk_module
import kernels.common.chunk_state as state_module
sys.path.insert(0, os.path.dirname(__file__))
import exp_inputs
from exp_inputs import rel


def chunk_variant(fused: bool, mixed: str | None, bwd: str | None = None, dk32: bool | None = None,
                  save: bool = True, fuse_o: bool = False):
    """chunk_delta_rule with the module switches set: FUSED_WY_FWD (wy.wy_fwd), the forward
    walk's mixed products (chunk_state.FWD_MIXED: split, tf32, round; None: by dtype) and the
    backward's recompute (chunk.BWD_RECOMPUTE: forward, inputs) and dk's partial
    (chunk.DK_PARTIAL_FLOAT32), each None for the library's choice by dtype. The backward reads
    them when it runs, so the switches stay set until the next variant's call (every variant,
    "chunk" included, sets all five). ``save``: chunk.SAVE_STATES (the forward keeps w, h, v'
    and the backward recomputes nothing; False: the recomputing backward, the default until
    2026-12-01). ``fuse_o``: chunk.FUSED_OUTPUT (the walk writes O; session g)."""
    def fn(*args, **kwargs):
        chunk_module.FUSED_WY_FWD, state_module.FWD_MIXED = fused, mixed
        chunk_module.BWD_RECOMPUTE, chunk_module.DK_PARTIAL_FLOAT32 = bwd, dk32
        chunk_module.SAVE_STATES, chunk_module.FUSED_OUTPUT = save, fuse_o
        return chunk_delta_rule(*args, **kwargs)
    return fn


IMPLS = {"chunk": chunk_variant(True, None), "chunk_fused": chunk_variant(True, "split"),
         "fla_chunk": fdr.chunk_delta_rule,
         "fused_recurrent": fused_recurrent_delta_rule, "fla_fused_recurrent": fdr.fused_recurrent_delta_rule}
for fused in (False, True):
    for mixed in ("split", "tf32", "round"):
        IMPLS[f"chunk{'_fused' if fused else ''}_{mixed}"] = chunk_variant(fused, mixed)
# (recomputing backwards) the backward's recompute with the forward's arithmetic (BWD_RECOMPUTE = "forward") and dk's
# partial in float32 (DK_PARTIAL_FLOAT32 = True): the defaults until 2026-11-23 session d
IMPLS["chunk_bwdfwd_dk32"] = chunk_variant(True, None, "forward", True, save=False)
IMPLS["chunk_bwdfwd"] = chunk_variant(True, None, "forward", False, save=False)
IMPLS["chunk_dk32"] = chunk_variant(True, None, "inputs", True, save=False)
# the recomputing backward (chunk.SAVE_STATES = False; bf16: BWD_RECOMPUTE "inputs"), the default
# of sessions d-e; and the forward walk's products rounded (FWD_MIXED "round") on top of today's
IMPLS["chunk_recompute"] = chunk_variant(True, None, save=False)
IMPLS["chunk_round"] = chunk_variant(True, "round")
# the output in the forward walk (chunk.FUSED_OUTPUT), on top of today's defaults
IMPLS["chunk_fusedo"] = chunk_variant(True, None, fuse_o=True)
for extra in filter(None, os.environ.get("EXTRA", "").split(",")):
    name, target = extra.split("=")
    module, function = target.split(":")
    IMPLS[name] = getattr(__import__(module), function)
what = sys.argv[1].split(",")
impls = sys.argv[2].split(",")
Ts = [int(t) for t in sys.argv[3].split(",")] if len(sys.argv) > 3 else [2048, 8192, 32768]

DEV = os.environ.get("EXP_DEVICE", "cuda")  # cpu (TRITON_INTERPRET=1): a smoke test of acc/warm
ACC_SHAPE = tuple(int(x) for x in os.environ.get("ACC_SHAPE", "2,1000,4,64").split(","))


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def inputs(B, T, H, D, seed=0, dev=DEV):
    return exp_inputs.inputs(B, T, H, D, seed, dev)

def grads(fn, xs, h0, dtype, do, dht):
    xs = [x.to(dtype).detach().requires_grad_() for x in xs]
    s0 = h0.to(torch.float32 if dtype != torch.float64 else dtype).detach().requires_grad_()
    o, ht = fn(*xs, initial_state=s0, output_final_state=True)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return [o, ht] + [x.grad for x in xs] + [s0.grad]

if "warm" in what:
    # compile only (one fwd+bwd per implementation at the acc and bench shapes), to be run as
    # one process per implementation in parallel before the timed run; autotune results are not
    # cached (TRITON_CACHE_AUTOTUNING unset), compiled kernels are
    for name in impls:
        t0 = time.time()
        for (B, T, H, D, dts) in [(*ACC_SHAPE, os.environ.get("ACC_DTYPES", "bfloat16")),
                                  (2, Ts[0], 16, 128, "bfloat16")][:2 if DEV == "cuda" else 1]:
            q, k, v, beta, h0 = inputs(B, T, H, D)
            for dt in [getattr(torch, d) for d in dts.split(",")]:
                if dt == torch.float32 and name == "fla_chunk":
                    continue
                xs = [x.to(dt).detach().requires_grad_() for x in (q, k, v, beta)]
                acc_shape = (B, T, H, D) == ACC_SHAPE
                o, ht = IMPLS[name](*xs, initial_state=h0.float() if acc_shape else None,
                                    output_final_state=acc_shape)
                o.float().sum().backward()
                with torch.no_grad():
                    IMPLS[name](*xs)
        sync()
        print(f"warm {name}: {time.time() - t0:.1f} s", flush=True)

if "acc" in what:
    names = ["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"]
    for (B, T, H, D) in [ACC_SHAPE]:
        q, k, v, beta, h0 = inputs(B, T, H, D)
        g = torch.Generator(device="cpu").manual_seed(1)
        do = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(DEV)
        dht = torch.randn(B, H, D, D, generator=g, dtype=torch.float64).to(DEV)
        for dt in [getattr(torch, d) for d in os.environ.get("ACC_DTYPES", "bfloat16").split(",")]:
            xs = [x.to(dt).double() for x in (q, k, v, beta)]  # the rounded inputs
            # the float64 truth on the CPU (its step loop is launch-bound on a GPU: ~60 s)
            ref = grads(naive_recurrent_delta_rule, [x.cpu() for x in xs], h0.cpu(), torch.float64,
                        do.cpu(), dht.cpu())
            for name in impls:
                if dt == torch.float32 and name == "fla_chunk":
                    continue
                got = grads(IMPLS[name], xs, h0, dt, do, dht)
                print(f"acc B={B} T={T} H={H} D={D} {str(dt)[6:]:9s} {name:20s} " +
                      " ".join(f"{n}={rel(a, b):.2e}" for n, a, b in zip(names, got, ref)), flush=True)

rows = []
if "bench" in what:
    B, H, D = 2, 16, int(os.environ.get("BENCH_D", "128"))
    for T in Ts:
        q, k, v, beta, _ = inputs(B, T, H, D)
        xs = [x.to(torch.bfloat16) for x in (q, k, v, beta)]
        for name in impls:
            fn = IMPLS[name]
            for mode in ("fwd", "fwdbwd"):
                ys = [x.detach().requires_grad_(mode != "fwd") for x in xs]
                if mode == "fwd":
                    def step():
                        with torch.no_grad():
                            return fn(*ys)
                else:
                    do = torch.randn_like(ys[2])
                    def step():
                        o = fn(*ys)[0]
                        return torch.autograd.grad(o, ys, do)
                step(); torch.cuda.synchronize()
                base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
                step(); torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                ms = do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
                rows.append(dict(impl=name, T=T, mode=mode, ms=ms[0], p20=ms[1], p80=ms[2], peak_mb=peak))
                print(f"bench T={T:6d} {mode:7s} {name:20s} {ms[0]:8.3f} ms [{ms[1]:.3f}, {ms[2]:.3f}] peak {peak:8.1f} MB", flush=True)
                del step
                torch.cuda.empty_cache()
    json.dump(rows, open(f"{OUT}/bench.json", "w"))

if "prof" in what:
    from torch.profiler import profile, ProfilerActivity
    B, H, D, T = 2, 16, 128, Ts[-1]
    q, k, v, beta, _ = inputs(B, T, H, D)
    xs = [x.to(torch.bfloat16).detach().requires_grad_() for x in (q, k, v, beta)]
    do = torch.randn_like(xs[2])
    for name in impls:
        fn = IMPLS[name]
        def step():
            o = fn(*xs)[0]
            return torch.autograd.grad(o, xs, do)
        for _ in range(3): step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): step()
            torch.cuda.synchronize()
        print(f"== prof {name} fwdbwd T={T}: per-call us")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:14]:
            print(f"   {e.key[:60]:60s} {e.device_time_total / 5:9.1f}")

if "cfg" in what:
    import kernels.common.chunk_state as cs, kernels.common.chunk_output as co, kernels.delta_rule.wy as wy
    for mod in (cs, co, wy):
        for n in dir(mod):
            obj = getattr(mod, n)
            while hasattr(obj, "fn") and not hasattr(obj, "configs"):
                obj = obj.fn  # heuristics wrap the autotuner
            if hasattr(obj, "cache") and hasattr(obj, "configs"):
                for key, cfg in obj.cache.items():
                    print(f"cfg {n}: {cfg}")
