#!/usr/bin/env bash
# Set everything up on a fresh machine, then segment the shipped sample scan with the shipped model,
# with a 10-run quality map. Results go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mednca segment src/mednca/sample/phantom.nii.gz -o out/ --quality 10 --report out/results.csv --overwrite
