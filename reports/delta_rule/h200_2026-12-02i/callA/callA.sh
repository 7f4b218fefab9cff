#!/usr/bin/env bash
# Session i, call A: verify session h's fix (the output stage's tiles at least 64 wide,
# chunk_output.OUTPUT_MIN_TILE) on every head-dim tiling class in bf16, the two miscompiled
# classes (K=64/48 with V=32, K=32 with V=64) in fp16 too; replay the random case that first
# showed it (|o| 128.2 against the truth's 114.2), stage by stage and under memcheck; and rerun
# check's random family under a cap. Logs straight to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=2
S="env LINATTN_AUTOTUNE=0 python3 reports/delta_rule/tile_sweep.py"
L="env LINATTN_AUTOTUNE=0 python3 reports/delta_rule/fwd_localize.py"
run() { local name=$1; shift; timeout 300 "$@" > $OUT/$name.txt 2>&1 & }
run bf16_a $S bfloat16 32,64 32,32 32,128
run bf16_b $S bfloat16 32,256 64,32 64,64
run bf16_c $S bfloat16 64,128 64,256 128,32
run bf16_d $S bfloat16 128,64 128,128 128,256
run bf16_e $S bfloat16 256,32 256,64 256,128
run bf16_f $S bfloat16 256,256 48,32 100,32
run fp16 $S float16 32,64 64,32 48,32
base='"gate":1.0,"initial_state":false,"op":"delta_rule","output_final_state":false,"scale":1.0,"seed":493892'
l2='"options":{"beta_per_channel":false,"use_qk_l2norm_in_kernel":true}'
d679='"dims":{"B":1,"H":2,"K":64,"T":679,"V":32}'
EX="{$d679,$base,$l2,\"seqlens\":[329,1,1,348]}"
S2="{$d679,$base,$l2,\"seqlens\":[329,2,348]}"
run loc_exact_bf16 $L bfloat16 "$EX"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUDA_LAUNCH_BLOCKING=1 timeout 300 \
    /usr/local/cuda-13/bin/compute-sanitizer --tool memcheck --print-limit 10 \
    $L bfloat16 "$S2" > $OUT/memcheck_s2_bf16.txt 2>&1 &
W=/tmp/A; mkdir -p $W
OMP_NUM_THREADS=4 timeout 420 python3 -m harness check delta_rule --impl chunk,fused_recurrent,parallel \
    --dtype bfloat16,float32 --family random --examples 40 --max-time 300 --out $W/random \
    > $OUT/random.txt 2>&1 &
wait
tar czf $OUT/A.tgz -C $W . 2>/dev/null
echo done
