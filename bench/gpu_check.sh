#!/usr/bin/env bash
# One prepared GPU check (H100/H200): build the extension with CUDA for sm_90, run the CUDA tests,
# run the benchmarks. Every step has its own time limit, and its output lands in $OUT as soon as
# it ends, so a run cut short still returns what it finished. At most 8 files in $OUT (the
# device's limit; default bench/results/gpu; a run of only some steps writes fewer):
#   summary.txt      device, versions, each step's exit status and seconds
#   build.log        compiler output, ptxas register/spill lines included
#   cuda-tests.log   pytest -m cuda (all CUDA kernels vs the reference, CUDA-graph steps), but
#                    tests/test_masked_attention_mma.py, which mma-tests runs
#   mma-tests.log    the masked-attention CUDA tests with the mma.sync kernels (the default; forward
#                    and backward: fp16/bf16, and fp32 through the 3xTF32 variants)
#   wmma-tests.log   the masked-attention CUDA tests again with the WMMA kernels (wmma)
#   simt-tests.log   the masked-attention CUDA tests again with the SIMT kernels forced
#   bench.log        every benchmark's table (and ncu-mma's Nsight Compute sections)
#   results.tar.gz   bench/results/*-<gpu>.{json,md}, for committing
# bench_masked_attention runs one round here (--rounds 1; its default of 3 interleaved rounds
# would not fit the step limits).
# Usage on the GPU machine, from the repository root:  bash bench/gpu_check.sh
# The steps run in this order, the most valuable first; GPU_CHECK_STEPS=a,b,... runs only those
# (in this order whatever order it lists them; an unknown name stops the script):
# Six groups, each one device call within 600 s even when every step runs to its limit (and
# its 15 s grace). A session's device time (900 s, the machine's start included) fits one
# group and a rerun of part of it; the others wait for a later session. Each group starts with
# `build`: on a fresh machine it compiles (sm_90a, 16 jobs), on a warm one it finds nothing to do.
#   W. the opt-in wgmma forward, limits 300 s: build (150 s), wgmma-forward-tests (75 s: the
#      forward tests with the mma.sync and the wgmma kernel), bench-wgmma-graph (75 s):
#        GPU_CHECK_STEPS=build,wgmma-forward-tests,bench-wgmma-graph
#      With most of group 0 in the same call (limits 510 s):
#        GPU_CHECK_STEPS=build,wgmma-forward-tests,bench-wgmma-graph,importance-graph-tests,bench-importance
#      With group F instead (limits 465 s):
#        GPU_CHECK_STEPS=build,wgmma-forward-tests,bench-wgmma-graph,fixed-gates-tests,bench-train-step-fixed,bench-captured-ops
#   F. CUDA-graph training with fixed gates, limits 315 s: build, fixed-gates-tests (60 s: graphs
#      with fixed gates train as the eager step), bench-train-step-fixed (75 s: BERT-base, all
#      heads and half its heads masked, graphs with and without fixed gates), bench-captured-ops
#      (30 s: tensor ops and FLOPs those graphs hold):
#        GPU_CHECK_STEPS=build,fixed-gates-tests,bench-train-step-fixed,bench-captured-ops
#   0. what is not yet measured or verified on a GPU, limits 450 s: build (150 s),
#      importance-graph-tests (60 s: importance(cuda_graph=True) vs the eager pass; the
#      first-token readout vs the full last layer; the gate-only backward; bf16 weights cast
#      once per pass vs per batch),
#      bench-masked-attention-graph-bwd (90 s: forward+backward in graph-replay GPU time vs
#      SDPA's), bench-importance (150 s: the eager and the graph-replayed importance pass vs a
#      plain forward+backward):
#        GPU_CHECK_STEPS=build,importance-graph-tests,bench-masked-attention-graph-bwd,bench-importance
#   1. the attention kernels, in two calls (its seven steps' limits add up to 585 s): build
#      (150 s), mma-tests (120 s: the mma.sync
#      forwards' and backwards' correctness, fp16/bf16 and fp32 through 3xTF32),
#      bench-masked-attention-graph (120 s: the forwards' graph-replay GPU time vs SDPA and the
#      WMMA/SIMT kernels), trace-mma (30 s: one traced call of each kernel), ncu-mma (60 s:
#      Nsight Compute sections of the forward at S=128 and 512), ncu-dense-compact (45 s: the
#      same for the dense and the compact output at S=128), wmma-tests (60 s).
#      After a kernel change (limits 480 s; on an H200 the first four steps took 134 s):
#        GPU_CHECK_STEPS=build,mma-tests,bench-masked-attention-graph,trace-mma,wmma-tests
#      To read counters instead (limits 375 s; ncu needs a machine that exposes them):
#        GPU_CHECK_STEPS=build,mma-tests,ncu-mma,ncu-dense-compact
#   2. the other CUDA tests and the backward's speed, limits 510 s: build, cuda-tests (150 s),
#      bench-masked-attention (150 s: eager fwd and fwd+bwd, S 128 and 512, fp32 too),
#      simt-tests (60 s):
#        GPU_CHECK_STEPS=build,cuda-tests,bench-masked-attention,simt-tests
#   3. the training-step, group_dot and masked-model benchmarks, limits 360 s: build,
#      bench-train-step (120 s), bench-group-dot (45 s), bench-masked-model (45 s: a whole
#      patched BERT-base with heads masked, evaluation forward and training forward+backward):
#        GPU_CHECK_STEPS=build,bench-train-step,bench-group-dot,bench-masked-model
set -uo pipefail
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
steps=${GPU_CHECK_STEPS:-}  # "build,cuda-tests,...": only those steps (default: all)
source bench/gpu_common.sh
gpu_env  # bench scripts import sparsebert from this tree
# sm_90a: the same code as sm_90 for every kernel, plus the opt-in wgmma forward. A list without
# it (a machine's TORCH_CUDA_ARCH_LIST=9.0) would build no wgmma code: its tests would all skip
# and its benchmark rows drop out, so its 9.0 becomes 9.0a, or 9.0a is added (sm_90a code runs
# on H100/H200).
arch=${TORCH_CUDA_ARCH_LIST:-9.0a}
plain=${arch//+PTX/}
if [[ ";${plain// /;};" != *";9.0a;"* ]]; then  # 9.0 becomes 9.0a (one build, not two), or add it
  arch=$(sed -E 's/(^|[; ])9\.0(\+PTX)?($|[; ])/\19.0a\2\3/' <<< "$arch")
  plain=${arch//+PTX/}
  [[ ";${plain// /;};" == *";9.0a;"* ]] || arch="$arch;9.0a"
fi
export TORCH_CUDA_ARCH_LIST=$arch SPARSEBERT_BUILD_CUDA=1 SPARSEBERT_PTXAS_VERBOSE=1
export SPARSEBERT_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16}
start=$SECONDS
gpu_summary

started=$(mktemp)  # the mark of this run's start (the summary itself is appended to by each step)
pack() {  # copy the benchmark tables/JSON (and profiler traces) this run wrote into $OUT (files
  # newer than its start: a committed table of an earlier run is left out, so a benchmark
  # that failed here cannot pass off the old one)
  find bench/results -name '*-nvidia-*' -newer "$started" -type f -print0 \
    | tar czf "$out/results.tar.gz" --null -T - 2>/dev/null || true
}

check_steps build mma-tests wgmma-forward-tests bench-wgmma-graph importance-graph-tests \
  fixed-gates-tests bench-train-step-fixed bench-captured-ops bench-masked-attention-graph \
  bench-masked-attention-graph-bwd trace-mma ncu-mma ncu-dense-compact cuda-tests wmma-tests \
  bench-masked-attention bench-train-step bench-group-dot bench-masked-model bench-importance \
  simt-tests

# Step 1: build (in place: this machine is a copy of the tree).
if ! step build 150 "$out/build.log" python3 setup.py build_ext --inplace; then
  tail -n 60 "$out/build.log"; exit 1
fi
# -v: a line per test, kept even when a step is cut at its limit
pytest_args=(-v -m cuda -p no:cacheprovider -rfE --timeout=60)

# Step 2: the masked-attention suite with the mma.sync kernels (the default, named explicitly:
# fp16/bf16 D 32/64 calls run them, fp32 D 32/64 calls the 3xTF32 forward and backward), and the
# mma tests.
SPARSEBERT_ATTENTION_KERNEL=mma step mma-tests 120 "$out/mma-tests.log" \
  python3 -m pytest "${pytest_args[@]}" tests/test_masked_attention.py tests/test_masked_attention_mma.py
step_tail "$out/mma-tests.log" 3

# The opt-in wgmma forward (SPARSEBERT_ATTENTION_KERNEL=wgmma; sm_90a, not yet run on a GPU): the
# forward tests with both forward kernels (each test first proves its kernel ran), then its
# graph-replay GPU time next to the mma.sync forward and SDPA (fp16 and bf16, its own tables
# masked_attention_graph_<dtype>_wgmma-<gpu>.md).
SPARSEBERT_REQUIRE_WGMMA=1 step wgmma-forward-tests 75 "$out/mma-tests.log" python3 -m pytest "${pytest_args[@]}" \
  tests/test_masked_attention_mma.py -k "forward or compact or cross_lengths"
step_tail "$out/mma-tests.log" 3
step bench-wgmma-graph 75 "$out/bench.log" bash -c "rc=0
  python3 bench/bench_masked_attention.py --rounds 1 --device cuda --timing graph --no-backward --seq 128 512 \
    --providers sdpa sparsebert sparsebert_wgmma sparsebert_compact --tag wgmma || rc=\$?
  python3 bench/bench_masked_attention.py --rounds 1 --device cuda --timing graph --no-backward --seq 128 512 \
    --providers sdpa sparsebert sparsebert_wgmma --dtype bfloat16 --tag wgmma || rc=\$?
  exit \$rc"; pack

# importance(cuda_graph=True) against the eager pass (forward, backward and accumulation
# replayed from one CUDA graph per batch shape; the option stays off by default until this passes),
# the first-token readout (the last layer at [CLS] only) against the full last layer, and the
# gate-only backward (d_head_gate read off the output) against the attention backward, and the
# bf16 pass with its weights cast once against autocast casting them per batch (equal up to the
# last bits that group_dot's float atomics vary on CUDA).
step importance-graph-tests 60 "$out/cuda-tests.log" python3 -m pytest "${pytest_args[@]}" \
  tests/test_importance_graph.py tests/test_first_token_readout.py tests/test_gate_grad_only.py \
  tests/test_importance_precision.py
step_tail "$out/cuda-tests.log" 3

# CUDA-graph training with fixed gates (CudaGraphStep(fixed_gates=True); off by default until this
# passes): the graphs leave masked heads' products and masked MLPs out; the tests compare training
# with the eager step (masks changed mid-run included), the benchmark a patched BERT-base with
# every other head masked, graphs with and without fixed gates (train_step_masked-<gpu>.md).
step fixed-gates-tests 60 "$out/cuda-tests.log" python3 -m pytest "${pytest_args[@]}" \
  tests/test_train_step.py -k fixed_gates
step_tail "$out/cuda-tests.log" 3
step bench-train-step-fixed 75 "$out/bench.log" python3 bench/bench_train_step.py --device cuda \
  --models bert-base --lengths 128,mixed --stem train_step_masked \
  --loops graphs,graphs_patched,graphs_patched_fixed,graphs_patched_half,graphs_patched_half_fixed
pack
# What those graphs hold, counted during a real capture: tensor ops and matrix-product FLOPs.
step bench-captured-ops 30 "$out/bench.log" python3 bench/bench_captured_ops.py --device cuda \
  --model bert-base --batch 32 --seq 128; pack

# Step 3: graph-replay GPU time; the providers sparsebert and sparsebert_compact (the mma.sync
# forward) and sparsebert_wmma (the WMMA kernel, switched on per call) next to SDPA, whose chosen
# backend the table names. In the float32 table sparsebert is the 3xTF32 mma.sync forward and
# sparsebert_wmma the SIMT kernel. Then one traced call of each kernel.
step bench-masked-attention-graph 120 "$out/bench.log" bash -c "rc=0
  python3 bench/bench_masked_attention.py --rounds 1 --device cuda --timing graph --no-backward --seq 128 512 || rc=\$?
  python3 bench/bench_masked_attention.py --rounds 1 --device cuda --timing graph --no-backward --dtype bfloat16 --seq 128 512 || rc=\$?
  python3 bench/bench_masked_attention.py --rounds 1 --device cuda --timing graph --no-backward --dtype float32 --seq 128 512 || rc=\$?
  exit \$rc"; pack
# Forward+backward (autograd.grad to q, k, v and the gate) in graph-replay GPU time, fp16, next to
# SDPA's; a provider whose capture fails gets a row naming the error.
step bench-masked-attention-graph-bwd 90 "$out/bench.log" python3 bench/bench_masked_attention.py --rounds 1 \
  --device cuda --timing graph --seq 128 512 --providers sdpa sparsebert; pack
step trace-mma 30 "$out/bench.log" python3 bench/trace_attention.py; pack
# Nsight Compute counters of the mma.sync forward at S=128 and S=512 (bench/ncu_attention.py):
# throughput against the ceilings, occupancy, and where warps stall. Needs a runtime that exposes
# the counters; elsewhere ncu says so and the step fails without stopping the others.
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
step ncu-mma 60 "$out/bench.log" "${ncu_bin:-ncu}" --clock-control none -k regex:mma_forward_kernel \
  --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section LaunchStats \
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' python3 bench/ncu_attention.py
# The same sections for the dense and the compact output at S=128, all heads (dense is ~2 us slower).
step ncu-dense-compact 45 "$out/bench.log" "${ncu_bin:-ncu}" --clock-control none -k regex:mma_forward_kernel \
  --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section LaunchStats \
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
  python3 bench/ncu_attention.py --dense-vs-compact

# Step 4: the other CUDA tests (each kernel test first asserts the CUDA kernel is registered;
# the mma tests ran in step 2).
step cuda-tests 150 "$out/cuda-tests.log" python3 -m pytest "${pytest_args[@]}" \
  --ignore=tests/test_masked_attention_mma.py tests/
step_tail "$out/cuda-tests.log" 3

# Step 5: eager fwd and fwd+bwd; S=512 runs the mma.sync backward's key-block/query-block items,
# the float32 table the 3xTF32 backward (sparsebert) against the SIMT one (sparsebert_wmma).
step bench-masked-attention 150 "$out/bench.log" bash -c "rc=0
  python3 bench/bench_masked_attention.py --rounds 1 --device cuda --seq 128 512 \
    --providers sdpa sdpa_gate gather_sdpa sparsebert sparsebert_wmma sparsebert_compact || rc=\$?
  python3 bench/bench_masked_attention.py --rounds 1 --device cuda --dtype float32 --dim 64 --seq 128 \
    --providers sdpa sparsebert sparsebert_wmma || rc=\$?
  exit \$rc"; pack
step bench-train-step 120 "$out/bench.log" python3 bench/bench_train_step.py --device cuda; pack
step bench-group-dot 45 "$out/bench.log" python3 bench/bench_group_dot.py --device cuda; pack
step bench-masked-model 45 "$out/bench.log" python3 bench/bench_masked_model.py --device cuda \
  --model bert-base --batch 32 --min-run-time 0.5; pack
# fp32 and bf16 rows (importance's CUDA default), 8 batches per call, the eager pass and the
# CUDA-graph one (sb_paper_graph) against a plain forward+backward, then a profile.
step bench-importance 150 "$out/bench.log" python3 bench/bench_importance.py --device cuda \
  --model bert-base --min-run-time 0.5 --rounds 2 --profile; pack

# Step 6: the kernels the mma.sync ones replaced (still run where those do not apply: unaligned
# rows, sm < 80, other head dims): WMMA, then SIMT.
SPARSEBERT_ATTENTION_KERNEL=wmma step wmma-tests 60 "$out/wmma-tests.log" \
  python3 -m pytest "${pytest_args[@]}" tests/test_masked_attention.py
step_tail "$out/wmma-tests.log" 3
export SPARSEBERT_ATTENTION_KERNEL=simt
step simt-tests 60 "$out/simt-tests.log" \
  python3 -m pytest "${pytest_args[@]}" tests/test_masked_attention.py
step_tail "$out/simt-tests.log" 3
echo "total: $((SECONDS - start)) s" | tee -a "$summary"
