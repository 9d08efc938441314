#!/usr/bin/env bash
# The peers the benchmarks run against, in versions that work with the supported torch.
# --no-deps: BackPACK declares torchvision, which pip would resolve by replacing torch; neither
# peer needs it for what the benchmarks call.
set -euo pipefail
python -m pip install --quiet --no-deps "opacus==1.6.0" "backpack-for-pytorch==1.7.1" einops unfoldNd opt_einsum
# whole-model Fisher trace peers (bench/trace_peers.py); nngeometry declares torchvision, which it
# does not import for what the benchmark calls
python -m pip install --quiet --no-deps "nngeometry==0.4" "curvlinops-for-pytorch==3.0.1" einconv linear_operator \
  jaxtyping wadler_lindig mpmath tqdm scipy
python -c "import opacus, backpack, nngeometry, curvlinops; print('peers installed: opacus', opacus.__version__, \
'/ backpack-for-pytorch 1.7.1 / nngeometry 0.4 / curvlinops-for-pytorch 3.0.1')"
