#!/usr/bin/env bash
# Set up diverse on a fresh machine: data, virtualenv, torch (CPU pin first), package.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# drop pip's noise about absent local index folders; pip's own exit status still counts (pipefail)
quiet_pip() { grep -v '^WARNING: Location' || true; }

# 1. Fashion-MNIST (Debian package) where apt is available and we are root.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || echo "setup: could not apt-get install dataset-fashion-mnist; set DIVERSE_DATA to a folder with the IDX files" >&2
  else
    echo "setup: Fashion-MNIST not in /usr/share/datasets/fashion-mnist; run 'apt-get install dataset-fashion-mnist' as root or set DIVERSE_DATA" >&2
  fi
fi

# 1b. Debian's Chromium, for the headless-browser test of the HTML report.
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; } \
      || echo "setup: could not apt-get install chromium; the report browser test will fail" >&2
  else
    echo "setup: /usr/bin/chromium missing; run 'apt-get install chromium' as root for the browser test" >&2
  fi
fi

# 2. Virtualenv with torch pinned FIRST, so nothing can resolve torch to a CUDA build.
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "diverse needs Python >= 3.11")'
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | quiet_pip

# 3. The package and its test tools (the torch range in pyproject is satisfied by the pin).
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | quiet_pip
# 3b. laplace-torch (the Laplace baseline) and the two packages of its stack whose metadata
#     requires torchvision: without dependencies, so pip can neither replace the CPU torch nor
#     pull torchvision (never imported on our code paths); their other requirements are pinned
#     in pyproject.toml and were installed just above.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps laplace-torch==0.3 \
  backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 2>&1 | quiet_pip
.venv/bin/python -c 'import sys, diverse, torch
if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"setup: torch {torch.__version__} installed, expected 2.13.0 (CPU)")
from diverse.methods.laplace_fit import laplace_class
laplace_class()  # laplace-torch imports (without torchvision)
import peft  # LoRA ensembles; it must not have replaced the torch pin (checked above)
print(f"setup: diverse {diverse.__version__}, torch {torch.__version__}")'
