#!/usr/bin/env bash
# Install unified_train's dependencies on an air-gapped GPU node whose image already has torch, from the
# wheelhouse that scripts/build_wheelhouse.py builds, into the Python environment that has torch.
#   usage: bash scripts/gpu_node_setup.sh [WHEELHOUSE=.whl] [PYTHON=python3]
# The project itself is linked from this checkout (like an editable install), so the code that runs is the
# code you see; its .pth also registers unified_train.compat in every interpreter (spawn children too).
set -euo pipefail
wheels=${1:-.whl}
python=${2:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
"$python" -c 'import torch' || { echo "no torch in $python: this installer expects the node image's torch"; exit 1; }
deps=$(ls "$wheels"/*.whl | grep -v '/unified_train-')
"$python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check $deps
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$repo" > "$site/unified_train_src.pth"
cp "$repo/unified_train_compat.pth" "$site/zz_unified_train_compat.pth"  # after the path .pth above
echo "unified_train installed into $("$python" -c 'import sys; print(sys.prefix)')"
