#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the checks and the whole test suite (.ci/run calls this).
# GUI tests need a display: pytest-xvfb starts a virtual one (Xvfb) by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src napari_nca tests benchmarks sample_data
.venv/bin/lint-imports
.venv/bin/npe2 validate napari.yaml
.venv/bin/python -m pytest -q "$@"
