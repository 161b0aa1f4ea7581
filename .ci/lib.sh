# Shared by .ci/run and .ci/demo: a project virtualenv with every dependency.
# shellcheck shell=bash

ensure_venv() {
  local root="$1"
  if [ ! -x "$root/.venv/bin/python" ]; then
    echo "==> creating virtualenv .venv"
    python3 -m venv "$root/.venv"
  fi
  local stamp="$root/.venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "==> installing dependencies (pyproject.toml)"
    "$root/.venv/bin/python" -m pip install -q --upgrade pip
    "$root/.venv/bin/python" -m pip install -q -e "$root[dev]"
    rm -f "$root"/.venv/.installed-* && touch "$stamp"
  fi
}
