#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo: capture the bundled model, check the gradient
# against autograd, find the top gradient paths, compute the entropy and draw a diagram.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m gradgraph.demo "$@"
