#!/usr/bin/env bash
# Session h, call G: call F found chunk_fwd_o wrong in bf16/fp16 at K=64, V=32 (every chunk,
# relative error ~1; memcheck: an out-of-bounds __shared__ read at its tril(QK^T) v' product,
# chunk_output.py:53), float32 and the fused walk right. Here: every head-dim tiling class,
# whole operator and output stage, against float64; and two candidate workarounds.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD LINATTN_AUTOTUNE=0 OMP_NUM_THREADS=2
S="python3 reports/delta_rule/tile_sweep.py"
run() { local name=$1; shift; timeout 230 "$@" > $OUT/$name.txt 2>&1 & }
run bf16_a $S bfloat16 32,32 32,64 32,128
run bf16_b $S bfloat16 32,256 64,32 64,64
run bf16_c $S bfloat16 64,128 64,256 128,32
run bf16_d $S bfloat16 128,64 128,128 128,256
run bf16_e $S bfloat16 256,32 256,64 256,128
run bf16_f $S bfloat16 256,256 48,32 100,32
run fp16 $S float16 64,32 32,32 128,32
run bv64 env VARIANT=bv64 $S bfloat16 64,32 32,32 128,32 256,32
run warps8 env VARIANT=warps8 $S bfloat16 64,32 32,32 128,32 256,32
wait
echo done
