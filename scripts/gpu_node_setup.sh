#!/usr/bin/env bash
# Install unified_train's dependencies on an air-gapped GPU node whose image already has torch, from the
# wheelhouse that scripts/build_wheelhouse.py builds, into a venv that sees the image's packages.
#   usage: bash scripts/gpu_node_setup.sh [WHEELHOUSE=.whl] [VENV=/tmp/unified_train_venv]
# The project itself is linked from this checkout (like an editable install), so the code that runs is the
# code you see; its .pth also registers unified_train.compat in every interpreter (spawn children too).
set -euo pipefail
wheels=${1:-.whl}
venv=${2:-/tmp/unified_train_venv}
repo=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv --system-site-packages --without-pip "$venv"
deps=$(ls "$wheels"/*.whl | grep -v '/unified_train-')
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check $deps
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$repo" > "$site/unified_train_src.pth"
cp "$repo/unified_train_compat.pth" "$site/zz_unified_train_compat.pth"  # after the path .pth above
echo "unified_train environment ready: source $venv/bin/activate"
