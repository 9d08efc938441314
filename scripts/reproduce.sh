#!/usr/bin/env bash
# The main job on its embedded default: install, then `fisher-ext reproduce` — the three claims of
# "Catastrophic Fisher Explosion" on MNIST-1D (generated locally), 3 seeds per configuration, with
# fisher_ext's own Fisher Penalty and Tr(F) monitor; the report lands in
# fisher-ext-results/reproduce/report.md. Extra arguments go to `fisher-ext reproduce`
# (e.g. --quick, --jobs N, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m fisher_ext reproduce "$@"
