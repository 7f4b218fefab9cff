#!/usr/bin/env bash
# Session i, call B: call A found K=32, V=64 still wrong under OUTPUT_MIN_TILE = 64 (bf16: dk
# 1.9, dbeta 1.2; fp16: dk 2.4, dbeta 0.9; o, dq, dv right), every other class right. Here:
# each backward stage in bf16/fp16 against the same stage in float32 on the same inputs
# (bwd_localize.py), with candidate workarounds (8 warps per kernel, 64-wide tiles everywhere);
# and the whole operator under min64. Logs in $OUT/B.tgz, one line each echoed.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=2 LINATTN_AUTOTUNE=0
W=/tmp/B; mkdir -p $W
L="python3 reports/delta_rule/bwd_localize.py"
S="python3 reports/delta_rule/tile_sweep.py"
run() { local name=$1; shift; timeout 240 "$@" > $W/$name.txt 2>&1 & }
run loc_bf16 $L bfloat16 32,64 32,32 64,64 16,64
run loc_fp16 $L float16 32,64 32,32
run loc_min64 env VARIANT=min64 $L bfloat16 32,64 16,64
run loc_w8_wy env VARIANT=warps8:wy_bwd_kernel $L bfloat16 32,64
run loc_w8_dqk env VARIANT=warps8:chunk_bwd_dqk_kernel $L bfloat16 32,64
run loc_w8_dh env VARIANT=warps8:chunk_bwd_dh_kernel $L bfloat16 32,64
run loc_w8_dvl env VARIANT=warps8:chunk_bwd_dv_local_kernel $L bfloat16 32,64
run sweep_min64 env VARIANT=min64 $S bfloat16 32,64 16,64 32,32
run sweep_T1000 env T=1000 $S bfloat16 32,64
wait
tar czf $OUT/B.tgz -C $W .
tail -n 5 $W/*.txt
