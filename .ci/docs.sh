#!/usr/bin/env bash
# Build the documentation site into _docs/ (every notebook executed, rendered by MkDocs Material + mkdocs-jupyter)
# and check it in headless Chromium.
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

start=$SECONDS
"$PY" .ci/build_docs.py "$@"
echo "docs: site built in $((SECONDS - start))s"
EFFNET_DOCS_REQUIRE_BROWSER=1 "$PY" -m pytest -q tests/test_docs.py
# nbdev_docs = nbdev's notebook processing + Quarto. Quarto is not installable here, so also check that nbdev's own
# full pipeline (which runs import/export/show_doc cells) processes every notebook into _proc/.
"$PY" -c "from nbdev.serve import proc_nbs; proc_nbs(force=True, n_workers=2)"
"$PY" -c "from pathlib import Path; import sys; n = {p.name for p in Path('nbs').glob('*.ipynb')} - {p.name for p in Path('_proc').glob('*.ipynb')}; sys.exit(f'nbdev could not process {sorted(n)}' if n else 0)"
echo "docs: site in _docs/ (open _docs/index.html; for its search, serve it: $PY -m http.server -d _docs),"
echo "      screenshot in _docs/_screenshots/model.png"
