#!/usr/bin/env bash
# Every GPU check and benchmark of issue 14 in ONE call of the device tool (about 8 minutes
# on an H200; each part has its own time limit, so one slow part cannot take the rest):
#
#   run(command="bash benchmarks/gpu_all.sh", timeout_s=560)
#
# It uses the machine's own python3 (PyTorch with CUDA) and this checkout's src/; the
# figures land in $OUT (they come back with the call) and in the output.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-all}
mkdir -p "$OUT"
part() {  # part NAME SECONDS COMMAND...: one logged, time-limited step
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}
part env 30 bash -c 'date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"'
# correctness: vmap = loop, exact resume, a bf16 step and the deferred divergence stop on CUDA
part cuda-tests 120 python3 -m pytest -q -m cuda tests/test_devices.py -p no:cacheprovider
# ResNet-20 (GroupNorm), M = 10, batch 128: DE per variant (images/s, peak memory), methods / DE
part throughput-groupnorm 200 python3 benchmarks/throughput.py --model resnet20 --device cuda \
  --methods de svgd wgd-kde f-wgd-kde forde-pca --steps 10 --repeats 3
# BatchNorm: no compile variants (the compiled vmap forward with BatchNorm buffers is slower
# to build); methods under plain vmap
part throughput-batchnorm 110 python3 benchmarks/throughput.py --model resnet20-bn --device cuda \
  --variants loop vmap vmap+bf16 --methods de svgd wgd-kde f-wgd-kde forde-pca \
  --method-variant vmap --steps 10 --repeats 3
# every method's step over DE, fp32 vmap, and the interaction's cost against M
part method-step 110 python3 benchmarks/method_step.py --models resnet20 --device cuda \
  --execution vmap --scaling 10 50 --steps 3 --repeats 3
# ensemble forms on ViT-B/16 at 224 px (issue 23): bytes, step time and peak memory per form
# and M, and the diversity methods over DE on heads and LoRA (needs peft importable there)
part forms-vit 150 python3 benchmarks/forms.py --model vit-b16 --device cuda --members 1 5 10 \
  --batch 32 --repeats 3
echo "figures in $OUT"
