#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system packages for a virtual display, a venv in .venv,
# the CPU build of torch first (a constraint keeps pip from pulling a CUDA build), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
    libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxkbcommon-x11-0 libgl1 libegl1 libdbus-1-3 libfontconfig1"
if command -v apt-get >/dev/null 2>&1 && ! dpkg -s $APT_PACKAGES >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $APT_PACKAGES >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
echo "torch==2.13.0" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".[plugin,test,cluster]"
