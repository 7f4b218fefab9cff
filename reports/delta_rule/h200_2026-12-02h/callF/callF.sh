#!/usr/bin/env bash
# Session h, call F: call E found chunk bf16/fp16 wrong (|o| 128.2 against the truth's 114.2;
# float32 right) on seqlens [329, 1, 1, 348], and an illegal memory access in chunk_fwd_o's
# launch on [329, 2, 348] and [329, 1, 349]. Here: each forward stage against its own float64
# math, chunk by chunk (fwd_localize.py), and memcheck of the faulting variant with the
# caching allocator off (every tensor its own allocation).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD CUDA_LAUNCH_BLOCKING=1 LINATTN_AUTOTUNE=0 OMP_NUM_THREADS=2
L="python3 reports/delta_rule/fwd_localize.py"
base='"gate":1.0,"initial_state":false,"op":"delta_rule","output_final_state":false,"scale":1.0,"seed":493892'
l2='"options":{"beta_per_channel":false,"use_qk_l2norm_in_kernel":true}'
d679='"dims":{"B":1,"H":2,"K":64,"T":679,"V":32}'
EX="{$d679,$base,$l2,\"seqlens\":[329,1,1,348]}"
S2="{$d679,$base,$l2,\"seqlens\":[329,2,348]}"
timeout 200 $L bfloat16 "$EX" > $OUT/loc_exact_bf16.txt 2>&1 &
timeout 200 $L float16 "$EX" > $OUT/loc_exact_fp16.txt 2>&1 &
timeout 200 $L float32 "$EX" > $OUT/loc_exact_f32.txt 2>&1 &
timeout 200 $L bfloat16 "$S2" > $OUT/loc_s2_bf16.txt 2>&1 &
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 230 /usr/local/cuda-13/bin/compute-sanitizer --tool memcheck \
    --print-limit 10 $L bfloat16 "$S2" > $OUT/memcheck_s2_bf16.txt 2>&1 &
wait
echo done
