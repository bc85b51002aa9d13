#!/usr/bin/env bash
# Creates (once) and prints the path of the project's virtual environment.
# The venv lives outside the clone, keyed by the requirements' hash, so a fresh clone on a
# machine that already built it reuses it, and a change of pins builds a new one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want="${1:-runtime}"   # runtime | test
reqs="$here/requirements.txt"
[ "$want" = test ] && reqs="$here/requirements-test.txt"
key=$(cat "$here/requirements.txt" "$here/requirements-test.txt" "$here/scripts/setup_env.sh" \
  "$here"/external_ops/setup.py "$here"/external_ops/fused_ln/* | sha256sum | cut -c1-12)
venv="${EVACLIP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/evaclip_paddle/venv-$key}"
stamp="$venv/.evaclip-$want"
if [ ! -f "$stamp" ]; then
  echo "[setup] building environment in $venv ($want)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
  "$venv/bin/python" -m pip install -q -r "$reqs" >&2
  if [ "$want" = test ]; then
    # torchvision 0.28's compiled ops link CUDA torch; this guard lets `import open_clip`
    # work beside the CPU torch (tests only, never the library).
    meta=$("$venv/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
    sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"
    touch "$venv/.evaclip-runtime"
  fi
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" >&2
  # The fused LayerNorm/RMSNorm op (C++; CUDA too where nvcc and a GPU Paddle exist). Without it the
  # models fall back to Paddle's own norm kernels, so a failed build is reported, not fatal.
  if ! (cd "$here/external_ops" && "$venv/bin/python" -m pip install -q --no-build-isolation . >&2); then
    echo "[setup] warning: external_ops (fused_ln) did not build; using Paddle's native norms" >&2
  fi
  rm -rf "$here/external_ops/build"
  touch "$stamp"
fi
# The editable install points at the clone that built the venv; a different clone re-points it.
if ! "$venv/bin/python" -c "import evaclip_paddle, os, sys; sys.exit(0 if os.path.realpath(os.path.dirname(evaclip_paddle.__file__)) == os.path.realpath('$here/evaclip_paddle') else 1)" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$here" >&2
fi
echo "$venv"
