#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine without network: the wheels carried in .whl/ (make gpu-wheels
# downloads them on a machine with network) are installed beside the machine's own torch first. Arguments go to the
# check, e.g. --out gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install --quiet --no-deps --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 benchmarks/gpu_check.py "$@"
