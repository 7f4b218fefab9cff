#!/usr/bin/env bash
# Session i, call C: call B localized K=32, V=64 to wy_bwd (bf16/fp16 dk 2.5, dbeta 1.0 against
# the same stage in float32; 8 warps did not help; an illegal address in it at K=16, V=64) and
# found every kernel right with 64-wide tiles everywhere. utils.MIN_TILE is now 64. Here, with
# that code: every head-dim tiling class in bf16 (and the narrow ones in fp16), the random
# family of `harness check` under a cap, and the GPU gate's delta-rule entries re-recorded
# (the k16/k32 cases' tiling changed; k64-v32-varlen, k32-v64, k16-v64 are new).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=2
W=/tmp/C; mkdir -p $W
S="env LINATTN_AUTOTUNE=0 python3 reports/delta_rule/tile_sweep.py"
run() { local name=$1; shift; timeout 420 "$@" > $W/$name.txt 2>&1 & }
OMP_NUM_THREADS=1 timeout 560 python3 -m harness gate --suite gpu --op delta_rule -j 8 --update \
    --out $W/gate > $W/gate.txt 2>&1 &
run bf16_a $S bfloat16 16,16 16,64 16,128 16,256 32,64
run bf16_b $S bfloat16 32,32 32,128 32,256 64,16 64,32
run bf16_c $S bfloat16 64,64 64,128 64,256 128,16 128,32
run bf16_d $S bfloat16 128,64 128,128 128,256 256,16 256,32
run bf16_e $S bfloat16 256,64 256,128 256,256 48,32 100,32 48,100
run fp16 $S float16 32,64 16,64 64,32 48,32 32,32
timeout 420 python3 -m harness check delta_rule --impl chunk,fused_recurrent,parallel \
    --dtype bfloat16,float32 --family random --examples 40 --max-time 240 --out $W/random \
    > $W/random.txt 2>&1 &
wait
cp suites/baselines/cuda-sm90.json $OUT/ 2>/dev/null
tar czf $OUT/C.tgz -C $W .
cat $W/bf16_*.txt $W/fp16.txt | grep -v "^ " | cut -c1-60
tail -n 25 $W/gate.txt; tail -n 8 $W/random.txt
