#!/usr/bin/env bash
# Newcomer command 2: set up (once) and run the test suite on the tiny offline models.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q --durations=25 tests "$@"
