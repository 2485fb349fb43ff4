#!/usr/bin/env bash
# One prepared GPU check (H100/H200): build the extension with CUDA for sm_90, run the CUDA tests,
# run the benchmarks. Every step has its own time limit, and its output lands in $OUT as soon as
# it ends, so a run cut short still returns what it finished. At most 7 files in $OUT
# (default bench/results/gpu):
#   summary.txt      device, versions, each step's exit status and seconds
#   build.log        compiler output, ptxas register/spill lines included
#   cuda-tests.log   pytest -m cuda (all CUDA kernels vs the reference, CUDA-graph steps; the
#                    mma.sync forward's tests set SPARSEBERT_ATTENTION_KERNEL=mma themselves)
#   simt-tests.log   the masked-attention CUDA tests again with the SIMT kernels forced
#   mma-tests.log    the masked-attention CUDA tests with the mma.sync kernels switched on
#                    (forward and backward: fp16/bf16, and fp32 through the 3xTF32 variants)
#   bench.log        every benchmark's table
#   results.tar.gz   bench/results/*-<gpu>.{json,md}, for committing
# Usage on the GPU machine, from the repository root:  bash bench/gpu_check.sh
#   GPU_CHECK_STEPS=build,bench-importance bash bench/gpu_check.sh   runs only those steps
#   GPU_CHECK_STEPS=build,mma-tests,bench-masked-attention-graph,trace-mma   the attention kernels
#   (the mma.sync forwards' and backwards' correctness, fp16/bf16 and fp32 (3xTF32), the
#   forwards' graph-replay GPU time vs SDPA, one traced call of each); then
#   GPU_CHECK_STEPS=bench-masked-attention (add build on a fresh machine) for fwd+bwd wall time
#   (S 128 and 512, fp32 too)
# Missing Python packages can travel as wheels in .whl/ (installed into /tmp/site first).
set -uo pipefail
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
steps=${GPU_CHECK_STEPS:-}  # "build,cuda-tests,...": only those steps (default: all)
source bench/gpu_common.sh
gpu_env  # bench scripts import sparsebert from this tree
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SPARSEBERT_BUILD_CUDA=1 SPARSEBERT_PTXAS_VERBOSE=1
export SPARSEBERT_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16}
start=$SECONDS
gpu_summary

pack() {  # copy benchmark tables/JSON (and profiler traces) written so far into $OUT
  tar czf "$out/results.tar.gz" bench/results/*-nvidia-* bench/results/profiles/*-nvidia-* 2>/dev/null || true
}

# Step 1: build (in place: this machine is a copy of the tree).
if ! step build 240 "$out/build.log" python3 setup.py build_ext --inplace; then
  tail -n 60 "$out/build.log"; exit 1
fi

# Step 2: CUDA tests (each kernel test first asserts the CUDA kernel is registered).
pytest_args=(-q -m cuda -p no:cacheprovider -rfE --timeout=60)
step cuda-tests 180 "$out/cuda-tests.log" python3 -m pytest "${pytest_args[@]}" tests/
tail -n 3 "$out/cuda-tests.log" >> "$summary"

# Step 3: benchmarks, the training step first (it serves the open fine-tuning work).
step bench-train-step 120 "$out/bench.log" python3 bench/bench_train_step.py --device cuda; pack
# Eager fwd and fwd+bwd; S=512 runs the mma.sync backward's key-block/query-block items, the
# float32 table the 3xTF32 backward (sparsebert_mma) against the SIMT one (sparsebert).
step bench-masked-attention 180 "$out/bench.log" bash -c "
  python3 bench/bench_masked_attention.py --device cuda --seq 128 512
  python3 bench/bench_masked_attention.py --device cuda --dtype float32 --dim 64 --seq 128"; pack
# Graph-replay GPU time; the providers include sparsebert_mma and sparsebert_compact (the mma.sync
# forward, switched on per call) next to SDPA, whose chosen backend the table names. In the
# float32 table those two columns are the 3xTF32 mma.sync forward and sparsebert the SIMT kernel.
step bench-masked-attention-graph 180 "$out/bench.log" bash -c "
  python3 bench/bench_masked_attention.py --device cuda --timing graph --no-backward --seq 128 512
  python3 bench/bench_masked_attention.py --device cuda --timing graph --no-backward --dtype bfloat16 --seq 128 512
  python3 bench/bench_masked_attention.py --device cuda --timing graph --no-backward --dtype float32 --seq 128 512"; pack
step trace-mma 40 "$out/bench.log" python3 bench/trace_attention.py; pack
step bench-group-dot 45 "$out/bench.log" python3 bench/bench_group_dot.py --device cuda; pack
step bench-importance 60 "$out/bench.log" python3 bench/bench_importance.py --device cuda --model bert-base --profile; pack

# Step 4: the whole masked-attention suite with the mma.sync kernels switched on (fp16/bf16
# D 32/64 calls then run them, fp32 D 32/64 calls the 3xTF32 forward and backward).
SPARSEBERT_ATTENTION_KERNEL=mma step mma-tests 180 "$out/mma-tests.log" \
  python3 -m pytest "${pytest_args[@]}" tests/test_masked_attention.py tests/test_masked_attention_mma.py
tail -n 3 "$out/mma-tests.log" >> "$summary"

# Step 5: the SIMT attention kernels (the tensor-core ones are the default for D=32/64).
export SPARSEBERT_ATTENTION_KERNEL=simt
step simt-tests 60 "$out/simt-tests.log" \
  python3 -m pytest "${pytest_args[@]}" tests/test_masked_attention.py
tail -n 3 "$out/simt-tests.log" >> "$summary"
echo "total: $((SECONDS - start)) s" | tee -a "$summary"
