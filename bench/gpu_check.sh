#!/usr/bin/env bash
# One prepared GPU check (H100/H200): build the extension with CUDA for sm_90, run the CUDA tests,
# run the kernel benchmarks. Writes at most 8 files to $OUT (default bench/results/gpu):
#   build.log, ptxas.txt, cuda-tests.log, masked_attention.md, group_dot.md, summary.txt
# Usage on the GPU machine, from the repository root:  bash bench/gpu_check.sh
# Missing Python packages can travel as wheels in .whl/ (installed into /tmp/site first).
set -uo pipefail
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SPARSEBERT_BUILD_CUDA=1 SPARSEBERT_PTXAS_VERBOSE=1
export SPARSEBERT_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16}
start=$SECONDS
{
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$out/summary.txt" 2>&1

# Step 1: build (in place: this machine is a copy of the tree).
if ! python3 setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"; echo "build failed" | tee -a "$out/summary.txt"; exit 1
fi
grep -E "Compiling entry|Used [0-9]+ registers|spill" "$out/build.log" > "$out/ptxas.txt" || true
echo "build: $((SECONDS - start)) s" >> "$out/summary.txt"

# Step 2: CUDA tests (each asserts the CUDA kernel is registered before comparing).
python3 -m pytest -q -m cuda -p no:cacheprovider tests/ > "$out/cuda-tests.log" 2>&1
echo "cuda tests: exit $? ($(tail -n 1 "$out/cuda-tests.log"))" >> "$out/summary.txt"

# Step 3: benchmarks (tables also land in bench/results/*-<gpu name>.md).
python3 bench/bench_masked_attention.py --device cuda > "$out/masked_attention.md" 2>&1
echo "masked attention bench: exit $?" >> "$out/summary.txt"
python3 bench/bench_group_dot.py --device cuda > "$out/group_dot.md" 2>&1
echo "group_dot bench: exit $?" >> "$out/summary.txt"
echo "total: $((SECONDS - start)) s" >> "$out/summary.txt"
cat "$out/summary.txt"
