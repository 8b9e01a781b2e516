#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job: optimize a GPT-2-style transformer and a ResNet-style
# CNN with tuning on, show the tuned table, then run again in a new process from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m torchtune_ops.demo "$@"
