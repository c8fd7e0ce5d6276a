#!/usr/bin/env bash
# The GPU suite of bench/bench.py as one short run, for a machine with a CUDA GPU (never part of the tests):
# 3D b0 (8,1,96,96,96) against MONAI and 2D b0 (256,3,224,224) against torchvision and timm under bf16 autocast,
# channels_last(_3d) and torch.compile, then 3D b4 (2,1,128,128,128) peak memory with and without gradient
# checkpointing. Writes bench/RESULTS-gpu.md and .json; commit them with the device named in the report.
#     bash bench/gpu.sh [extra bench.py flags, e.g. --rounds 3]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA GPU here, nothing measured')"
"$PY" bench/bench.py --only --gpu --bf16 --channels-last --compile --rounds 5 --no-rss --out bench/RESULTS-gpu.md "$@"
