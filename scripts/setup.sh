#!/usr/bin/env bash
# Set up (or update) a virtual environment with torch, the build tools and sparsebert installed
# editable with its native extension built. Safe to re-run: it rebuilds the extension.
#
#   SPARSEBERT_VENV    where the environment lives            (default: .venv)
#   SPARSEBERT_TORCH   the torch requirement to install       (default: torch==2.13.0)
#   SPARSEBERT_EXTRAS  extras of the project to install       (default: test,ray)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SPARSEBERT_VENV:-.venv}
torch_spec=${SPARSEBERT_TORCH:-torch==2.13.0}
extras=${SPARSEBERT_EXTRAS:-test,ray}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
echo "[setup] installing $torch_spec and build tools"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_spec" setuptools wheel pybind11 ninja
echo "[setup] building and installing sparsebert[$extras] (native extension; a minute or two)"
MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip install -q --disable-pip-version-check \
  --no-build-isolation -e ".[$extras]"
"$venv/bin/python" -c "import sparsebert.ops as o; print('[setup] sparsebert ready; native kernels:', o._C.build_info()['kernels'] if o._C else None)"
