#!/usr/bin/env bash
# Build the documentation site into _docs/ (every notebook executed) and check it in headless Chromium.
#   bash .ci/docs.sh [build_docs.py options, e.g. --slow]
# Installs Debian's `chromium` with apt-get when it is missing (CI runs this as root).
# Set PYTHON to choose the interpreter (default: python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

"$PY" .ci/build_docs.py "$@"
EFFNET_DOCS_REQUIRE_BROWSER=1 "$PY" -m pytest -q tests/test_docs.py
echo "docs: site in _docs/ (open _docs/index.html), screenshot in _docs/_screenshots/model.png"
