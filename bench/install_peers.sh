#!/usr/bin/env bash
# The peers the benchmarks run against, in versions that work with the supported torch.
# --no-deps: BackPACK declares torchvision, which pip would resolve by replacing torch; neither
# peer needs it for what the benchmarks call.
set -euo pipefail
python -m pip install --quiet --no-deps "opacus==1.6.0" "backpack-for-pytorch==1.7.1" einops unfoldNd opt_einsum
python -c "import opacus, backpack; print('peers installed: opacus', opacus.__version__, '/ backpack-for-pytorch 1.7.1')"
