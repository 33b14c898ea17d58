#!/usr/bin/env bash
# Installs the Label Studio server (the `label-studio` PyPI package) into its own virtual
# environment, because it pins many dependencies that must not leak into binloop's venv.
# Idempotent: does nothing when the wanted version is already there.
#
#   tools/install_label_studio.sh [VENV_DIR]     (default: .venv-label-studio)
#
# The tests (tests/labelstudio_fixture.py) look for <VENV_DIR>/bin/label-studio, or for the
# path in BINLOOP_LABEL_STUDIO_BIN.
set -euo pipefail

LABEL_STUDIO_VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
VENV="${1:-.venv-label-studio}"

installed_version() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
from importlib.metadata import version
print(version("label-studio"))
PY
}

if [[ -x "$VENV/bin/label-studio" && "$(installed_version)" == "$LABEL_STUDIO_VERSION" ]]; then
    exit 0
fi

echo "installing label-studio $LABEL_STUDIO_VERSION into $VENV (a few minutes, once)" >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "label-studio==$LABEL_STUDIO_VERSION"
# Importing is enough of a check: `label-studio --version` would set up a data folder in $HOME.
"$VENV/bin/python" -c "import label_studio"
echo "label-studio $(installed_version) ready: $VENV/bin/label-studio" >&2
