#!/usr/bin/env bash
# Create .venv and install Switchboard with every extra (ray included: CI runs the Ray Serve test). Safe to run again.
# torch is pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e '.[routing,train,dev,ray]'
# lorax-client pins an old huggingface_hub, so it gets a venv of its own (tests/product/test_lorax_client.py runs it)
[ -x .venv-lorax/bin/python ] || "$PY" -m venv .venv-lorax
.venv-lorax/bin/pip install -q "lorax-client==0.6.3"
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
