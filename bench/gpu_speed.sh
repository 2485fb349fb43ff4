#!/usr/bin/env bash
# The GPU part of the speed targets (H100/H200), as one prepared run: the fast path's CUDA tests,
# then the `sparsebert speed` tables (BERT-base shapes, random weights, fp16):
#   B=32 S=128 full lengths: stock HF eager / + CUDA graph, dense, 50% heads + 50% FFN masked, pruned
#   B=32 S=128 full lengths: the same with 75% + 75%
#   B=128 S=128 lengths uniform in [S/4, S]: unpadded vs padded (50% + 50% for the masked rows)
#   B=32 S=128 full lengths, dense fast path: eager vs CUDA graphs vs torch.compile
# The extension is built first (the fast path itself runs PyTorch ops only, but the masked and
# physically pruned models run sparsebert's attention op: without the CUDA kernels they would
# time the pure-PyTorch reference); SPEED_BUILD=0 skips the build.
# Each step has its own time limit and its output lands in $OUT when it ends:
#   summary.txt  device, versions, each step's status and seconds, the target lines
#   build.log    compiler output
#   tests.log    pytest of tests/test_speed.py on the GPU (CUDA-graph cases included)
#   speed.log    the three tables
#   speed-results.tar.gz  bench/results/speed-*-<gpu>.{json,md}, to unpack in the repository
# (5 files: what comes back from a device run is limited to a few files).
# Usage on the GPU machine, from the repository root:  bash bench/gpu_speed.sh
# The step limits add up to more than one device call allows (600 s): run it as two calls, each
# within 600 s with every step at its limit (and its 15 s grace), each starting with `build` (it
# compiles on a fresh machine and finds nothing to do on a warm one):
#   GPU_SPEED_STEPS=build,tests,speed-b32-50,speed-b32-75 bash bench/gpu_speed.sh    (510 s)
#   GPU_SPEED_STEPS=build,speed-b128-uniform,speed-compile bash bench/gpu_speed.sh   (540 s)
# (an unknown step name stops the script).
set -uo pipefail
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
steps=${GPU_SPEED_STEPS:-}  # "build,tests,...": only those steps (default: all)
source bench/gpu_common.sh
check_steps build tests speed-b32-50 speed-b32-75 speed-b128-uniform speed-compile
gpu_env
gpu_summary "varlen attention: $(python3 -c "import torch.nn.attention.varlen" 2>/dev/null && echo yes || echo "no (re-padded SDPA)")"
started=$(mktemp)  # the mark of this run's start
collect() {  # the speed tables this run wrote (newer than its start: a committed table of an
  # earlier run is left out, so a step that failed here cannot pass off the old one)
  find bench/results -name 'speed-*-nvidia-*' -newer "$started" -type f -print0 \
    | tar czf "$out/speed-results.tar.gz" --null -T - 2>/dev/null || true
}

# Step 0: build the extension for sm_90 in place (this machine holds a copy of the tree).
if [ "${SPEED_BUILD:-1}" = 1 ]; then
  # the tables must time the CUDA kernels: a failed build stops here, and a missing extension
  # fails at import instead of timing the pure-PyTorch references
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SPARSEBERT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
  export SPARSEBERT_REQUIRE_EXT=1
  if ! step build 150 "$out/build.log" python3 setup.py build_ext --inplace; then
    tail -n 60 "$out/build.log"; exit 1
  fi
fi
python3 -c "from sparsebert import ops; print('masked_attention native kernels:', ops.native_dispatch_keys('masked_attention'))" >> "$summary" 2>&1

# Step 1: the fast path on the GPU (CUDA graphs, varlen), and its CPU tests for good measure.
step tests 120 "$out/tests.log" python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_speed.py
step_tail "$out/tests.log" 2

# Step 2: the tables (each run times its rows interleaved; device-side timing with CUDA events).
common=(--device cuda --model bert-base --dtype fp16 --seq 128 --repeats 30)
step speed-b32-50 120 "$out/speed.log" python3 bench/bench_speed.py "${common[@]}" --batch 32 \
  --prune 0.5 --cases full --name speed-b32-p50; collect
step speed-b32-75 120 "$out/speed.log" python3 bench/bench_speed.py "${common[@]}" --batch 32 \
  --prune 0.75 --cases full --name speed-b32-p75; collect
step speed-b128-uniform 150 "$out/speed.log" python3 bench/bench_speed.py "${common[@]}" \
  --batch 128 --prune 0.5 --cases uniform --name speed-b128-uniform; collect
# Step 3: CUDA graphs vs torch.compile on the fast path (dense, B=32 S=128 full lengths).
step speed-compile 240 "$out/speed.log" python3 bench/bench_speed.py "${common[@]}" --batch 32 \
  --cases '' --compile --name speed-b32-compile; collect
grep -h -A6 "^| target" "$out/speed.log" >> "$summary" 2>/dev/null
grep -h -A3 "^### torch.compile" "$out/speed.log" >> "$summary" 2>/dev/null
echo "total: $SECONDS s" | tee -a "$summary"
