#!/usr/bin/env bash
# Real GLUE fine-tunes on a GPU (bf16, one CUDA graph per batch shape), plus RTE once more with
# the eager step for comparison. Each run's results.json is appended to $OUT/finetunes.jsonl as
# soon as it ends, and a table is printed at the end.
#
#   bash bench/gpu_finetune.sh MODEL_DIR GLUE_DIR [TASK...]    (default tasks: RTE MRPC STS-B CoLA SST-2)
#
# MODEL_DIR is the default model's directory (or any BERT); the lr preset is `minilm`.
# Each run is limited to 150 s: the default tasks make 6 runs (up to 900 s), more than one
# 600-second device command; name one task per call (RTE runs twice in every call, so a call
# makes at most 3 runs, 450 s).
# FINETUNE_ARGS adds flags to every run (e.g. "--max-train-examples 64 --epochs 1").
set -uo pipefail
model=$1 glue=$2; shift 2
if [ $# -gt 0 ]; then tasks=("$@"); else tasks=(RTE MRPC STS-B CoLA SST-2); fi
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
runs=$(mktemp -d)

finetune() {  # finetune TASK GRAPHS
  local task=$1 graphs=$2 t0=$SECONDS
  timeout 150 python3 -m sparsebert finetune --task "$task" --model "$model" --glue-dir "$glue" \
    --preset minilm --seed 42 --cuda-graphs "$graphs" --out "$runs/$task-$graphs" ${FINETUNE_ARGS:-} \
    >> "$out/finetune.log" 2>&1
  echo "$task cuda_graphs=$graphs: exit $?, $((SECONDS - t0)) s" | tee -a "$out/finetune.log"
  [ -f "$runs/$task-$graphs/results.json" ] && \
    python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
      "$runs/$task-$graphs/results.json" >> "$out/finetunes.jsonl"
}

finetune RTE on
finetune RTE off
for task in "${tasks[@]}"; do
  [ "$task" = RTE ] || finetune "$task" on
done
python3 - "$out/finetunes.jsonl" <<'EOF'
import json, sys
print("| task | cuda graphs | dev metrics | train time (s) | train examples/s | device |")
print("|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"][next(iter(r["metrics"]))].items())
    print(f"| {r['task']} | {r['config']['cuda_graphs']} | {metrics} | {r['train_time_s']:.1f} "
          f"| {r['train_examples_per_s']:.0f} | {r['device_name']} |")
EOF
