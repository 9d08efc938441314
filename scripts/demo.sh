#!/usr/bin/env bash
# The main job on its embedded default: install, then Tr(F) of a small CNN from the ops,
# checked against torch.func. Extra arguments go to `python -m fisher_ext.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m fisher_ext.demo "$@"
