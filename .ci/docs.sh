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
# nbdev_docs = nbdev's notebook processing + Quarto. Quarto is not installable here, so check the first half:
# every notebook goes through nbdev's own doc processors (which run import/export/show_doc cells) into _proc/.
"$PY" -c "from nbdev.serve import proc_nbs; proc_nbs(force=True, n_workers=2)"
"$PY" -c "from pathlib import Path; import sys; n = {p.name for p in Path('nbs').glob('*.ipynb')} - {p.name for p in Path('_proc').glob('*.ipynb')}; sys.exit(f'nbdev could not process {sorted(n)}' if n else 0)"
EFFNET_DOCS_REQUIRE_BROWSER=1 "$PY" -m pytest -q tests/test_docs.py
echo "docs: site in _docs/ (open _docs/index.html), screenshot in _docs/_screenshots/model.png"
