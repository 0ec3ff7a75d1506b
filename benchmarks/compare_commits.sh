#!/usr/bin/env bash
# Whole training runs of one config at two source trees, interleaved (A, B, A, B, ...).
#   bash benchmarks/compare_commits.sh OLD_SRC OLD_CLI_MODULE OLD_CONFIG NEW_CONFIG [ROUNDS]
# e.g. after `git worktree add /tmp/old 6f3ae85`:
#   bash benchmarks/compare_commits.sh /tmp/old/src diverse.cli \
#        /tmp/old/examples/fashion_mnist_de.toml examples/fashion_mnist_de.toml 2
# Prints per run: the training seconds (sum of the history's per-epoch seconds: the loop,
# held-out figures included, checkpoint writes excluded), the wall seconds of the command,
# and the test accuracy or RMSE. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
old_src=$1 old_cli=$2 old_cfg=$3 new_cfg=$4 rounds=${5:-2}
py=.venv/bin/python
echo "# $(date -u +%F) · $($py -c 'import torch, platform; print(platform.python_version(), "torch", torch.__version__, platform.machine())') · load $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$rounds"); do
  for v in old new; do
    out=$(mktemp -d)/run
    start=$(date +%s.%N)
    if [ "$v" = old ]; then
      PYTHONPATH="$old_src" $py -m "$old_cli" train "$old_cfg" --out "$out" --quiet >/dev/null 2>&1
    else
      $py -m diverse.app.cli train "$new_cfg" --out "$out" --quiet >/dev/null 2>&1
    fi
    end=$(date +%s.%N)
    $py - "$v" "$out" "$start" "$end" <<'PY'
import glob, json, sys
v, out, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
history = json.load(open(sorted(glob.glob(out + "/checkpoints/epoch-*.json"))[-1]))["history"]
figures = json.load(open(out + "/metrics.json"))
score = {k: figures[k] for k in ("accuracy", "rmse") if k in figures}
print(f"{v}: train {sum(r['seconds'] for r in history):.1f} s, wall {end - start:.1f} s, "
      f"{len(history)} epochs, {score}")
PY
  done
done
