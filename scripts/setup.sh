#!/usr/bin/env bash
# Set up (or update) a virtual environment with torch, the build tools and sparsebert installed
# editable with its native extension built. Safe to re-run: it rebuilds the extension.
#
#   SPARSEBERT_VENV    where the environment lives            (default: .venv)
#   SPARSEBERT_TORCH   the torch requirement to install       (default: the venv's torch if it
#                      has one, else torch==2.13.0)
#   SPARSEBERT_PYTHON  the Python (>= 3.10) to create the venv with (default: python3)
#   SPARSEBERT_EXTRAS  extras of the project to install       (default: test,ray)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SPARSEBERT_VENV:-.venv}
extras=${SPARSEBERT_EXTRAS:-test,ray}
python=${SPARSEBERT_PYTHON:-python3}

fail() { echo "[setup] error: $*" >&2; exit 1; }
# usable PY: a Python >= 3.10 with pip
usable() { "$1" -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }

command -v "${CXX:-c++}" > /dev/null || command -v g++ > /dev/null \
  || fail "no C++ compiler (${CXX:-c++} or g++) found: the native extension needs one (on" \
          "Debian/Ubuntu: apt install build-essential; or set CXX)"
if [ -x "$venv/bin/python" ] && ! usable "$venv/bin/python"; then
  echo "[setup] $venv is not usable (Python < 3.10 or no pip): creating it again"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  command -v "$python" > /dev/null || fail "$python not found (set SPARSEBERT_PYTHON=/path/to/python3.10+)"
  version=$("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null) \
    || fail "$python is not a working Python (set SPARSEBERT_PYTHON=/path/to/python3.10+)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$python is Python $version: sparsebert needs 3.10 or newer (set" \
            "SPARSEBERT_PYTHON=/path/to/python3.10+)"
  echo "[setup] creating $venv with $python"
  "$python" -m venv "$venv" || { rm -rf "$venv"; fail "$python -m venv failed (on Debian/Ubuntu:" \
                                                      "apt install python3-venv)"; }
fi
# The torch to build against: SPARSEBERT_TORCH when given; else the one already in the venv (a
# rerun keeps e.g. a CUDA build installed with SPARSEBERT_TORCH); else torch==2.13.0.
torch_spec=${SPARSEBERT_TORCH:-}
installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ -z "$torch_spec" ] && [ -n "$installed" ]; then
  echo "[setup] keeping torch $installed (SPARSEBERT_TORCH=torch==X.Y.Z replaces it)"
  torch_spec=torch
fi
torch_spec=${torch_spec:-torch==2.13.0}
echo "[setup] installing $torch_spec and build tools"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_spec" setuptools wheel pybind11 ninja
echo "[setup] building and installing sparsebert[$extras] (native extension; a minute or two)"
MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip install -q --disable-pip-version-check \
  --no-build-isolation -e ".[$extras]"
"$venv/bin/python" - <<'PY'
import torch
import sparsebert.ops as o

info = o._C.build_info() if o._C else None
print("[setup] sparsebert ready; native kernels:", info["kernels"] if info else None)
if torch.cuda.is_available() and not (info and info.get("cuda_version")):
    print("[setup] note: this torch sees a GPU but the extension has no CUDA kernels (no CUDA "
          "toolkit found: install one, or set CUDA_HOME, then rerun this script); the CUDA "
          "attention and importance ops fall back to the PyTorch references")
PY
