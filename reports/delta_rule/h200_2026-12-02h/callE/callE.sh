#!/usr/bin/env bash
# Session h, call E: replay the case on which call D's random family hit an illegal memory
# access in chunk bf16, and variants of it, each in its own process (a fault is sticky).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD CUDA_LAUNCH_BLOCKING=1 LINATTN_AUTOTUNE=0 OMP_NUM_THREADS=2
R="python3 reports/delta_rule/fault_repro.py"
base='"gate":1.0,"initial_state":false,"op":"delta_rule","output_final_state":false,"scale":1.0,"seed":493892'
l2='"options":{"beta_per_channel":false,"use_qk_l2norm_in_kernel":true}'
nol2='"options":{"beta_per_channel":false,"use_qk_l2norm_in_kernel":false}'
d679='"dims":{"B":1,"H":2,"K":64,"T":679,"V":32}'
run() { timeout 200 $R $2 "$3" > $OUT/$1.txt 2>&1 & }
run exact_bf16 bfloat16 "{$d679,$base,$l2,\"seqlens\":[329,1,1,348]}"
run exact_f32 float32 "{$d679,$base,$l2,\"seqlens\":[329,1,1,348]}"
run exact_fp16 float16 "{$d679,$base,$l2,\"seqlens\":[329,1,1,348]}"
run nol2_bf16 bfloat16 "{$d679,$base,$nol2,\"seqlens\":[329,1,1,348]}"
run s2_bf16 bfloat16 "{$d679,$base,$l2,\"seqlens\":[329,2,348]}"
run s1_bf16 bfloat16 "{$d679,$base,$l2,\"seqlens\":[329,1,349]}"
run small_bf16 bfloat16 "{\"dims\":{\"B\":1,\"H\":2,\"K\":64,\"T\":222,\"V\":32},$base,$l2,\"seqlens\":[100,1,1,120]}"
run v64_bf16 bfloat16 "{\"dims\":{\"B\":1,\"H\":2,\"K\":64,\"T\":679,\"V\":64},$base,$l2,\"seqlens\":[329,1,1,348]}"
(which compute-sanitizer; ls /usr/local/cuda*/bin 2>/dev/null | head -30) > $OUT/tools.txt 2>&1
wait
echo done
