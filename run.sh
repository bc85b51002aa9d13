#!/usr/bin/env bash
# The two commands of the README:
#   bash run.sh demo   -> set up, train a small EVA02 CLIP on a generated shapes set, evaluate zero-shot
#   bash run.sh test   -> set up (with the PyTorch peers) and run the whole test suite
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd="${1:-demo}"; shift || true
case "$cmd" in
  demo)
    venv=$("$here/scripts/setup_env.sh" runtime)
    exec "$venv/bin/python" -m evaclip_paddle.demo "$@" ;;
  test)
    venv=$("$here/scripts/setup_env.sh" test)
    cd "$here"
    exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@" ;;
  *) echo "usage: bash run.sh demo|test [args...]" >&2; exit 2 ;;
esac
