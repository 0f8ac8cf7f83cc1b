#!/usr/bin/env bash
# Set up everything gradgraph needs on a fresh machine: a .venv with torch (CPU build), the package
# with its test and experiment extras, and Graphviz (for rendered diagrams). Safe to run again:
# it only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "gradgraph setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

stamp=.venv/.gradgraph-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "gradgraph setup: installing Python packages (first run takes a few minutes)"
  # torch first, pinned: a bare 'torch' requirement could pull a multi-GB CUDA build
  if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  fi
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,experiments]"
  echo "$want" > "$stamp"
fi

# torchvision and timm for the model zoo's CNNs (tests/vision_libs.py imports them), in a directory
# that is not on the import path: the torchvision wheel matching torch 2.13 is a CUDA build that
# cannot import beside the CPU torch until the tests define two op schemas, and transformers imports
# any torchvision it finds. --no-deps: their other requirements are already in the venv.
VISION_LIBS=.venv/vision-libs
if [ ! -d "$VISION_LIBS/torchvision" ] || [ ! -d "$VISION_LIBS/timm" ]; then
  echo "gradgraph setup: installing torchvision and timm into $VISION_LIBS"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$VISION_LIBS" \
    "torchvision==0.28.0" "timm==1.0.29"
fi

if ! command -v dot >/dev/null 2>&1; then
  echo "gradgraph setup: installing Graphviz"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq graphviz >/dev/null) \
      || echo "gradgraph setup: could not install Graphviz; diagrams will be written as .dot only" >&2
  elif command -v brew >/dev/null 2>&1; then
    brew install graphviz || true
  else
    echo "gradgraph setup: please install Graphviz (https://graphviz.org); .dot output works without it" >&2
  fi
fi

# the HTML report's browser test drives headless Chromium through its own driver
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "gradgraph setup: installing Chromium and its driver (for the HTML report's browser test)"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "gradgraph setup: could not install chromium; the browser test of the report will be skipped" >&2
  else
    echo "gradgraph setup: please install Chromium and chromedriver to run the report's browser test" >&2
  fi
fi
