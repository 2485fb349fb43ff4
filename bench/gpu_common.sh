# Shared by the prepared GPU scripts (gpu_check.sh, gpu_speed.sh, gpu_sweep.sh); source it after
# setting $out (the output folder) and, for `step`, $steps (a comma list of step names to run;
# empty: all).
#   gpu_env              PYTHONPATH with this tree, and wheels carried in .whl/ installed into
#                        /tmp/site (missing packages on the GPU machine)
#   gpu_summary [LINE]   device, versions and git state (and LINE) into $out/summary.txt
#   check_steps NAME...  exit 2 unless every name in $steps is one of NAME... (a typo would
#                        skip a step silently)
#   step NAME LIMIT_S LOG CMD...
#                        run CMD with a time limit, its output appended to LOG; its status and
#                        seconds appended to the summary; returns CMD's exit status. At the limit
#                        CMD gets SIGINT (pytest then still prints its summary of failures),
#                        and SIGKILL 15 s later.
summary="$out/summary.txt"

check_steps() {
  local name known=",$(IFS=,; echo "$*"),"
  [ -z "${steps:-}" ] && return 0
  IFS=, read -ra wanted <<< "$steps"
  for name in "${wanted[@]}"; do
    if [[ "$known" != *",$name,"* ]]; then
      echo "unknown step '$name' in '$steps'; the steps: $*" | tee -a "$summary" >&2
      exit 2
    fi
  done
}

gpu_env() {
  export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

gpu_summary() {
  {
    echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) files changed"
    if [ $# -gt 0 ]; then echo "$@"; fi
  } > "$summary" 2>&1
}

step() {
  local name=$1 limit=$2 log=$3; shift 3
  step_ran=0  # (read by step_tail)
  if [ -n "${steps:-}" ] && [[ ",$steps," != *",$name,"* ]]; then return 0; fi
  step_ran=1
  local t0=$SECONDS
  echo "== $name (limit $limit s)" >> "$log"
  timeout -s INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$summary"
  return $rc
}

# The last lines of a step's log into the summary (a test step's pass/fail counts), only when
# that step ran in this call (a skipped step's log is missing, or another step's).
step_tail() {
  local log=$1 lines=${2:-3}
  if [ "${step_ran:-0}" = 1 ] && [ -f "$log" ]; then tail -n "$lines" "$log" >> "$summary"; fi
  return 0
}
