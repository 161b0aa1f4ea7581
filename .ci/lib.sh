# Shared by .ci/run and .ci/demo: a project virtualenv with the dependencies they need.
# shellcheck shell=bash

# ensure_venv ROOT [EXTRA]: .venv with the project installed, plus the optional EXTRA
# ("dev": what the tests need). The demo asks for none, so its first run skips the test
# tools (playwright, moto, the SDKs, ...); a later `.ci/run` adds them.
ensure_venv() {
  local root="$1" extra="${2:-}"
  if [ ! -x "$root/.venv/bin/python" ]; then
    echo "==> creating virtualenv .venv"
    python3 -m venv "$root/.venv"
  fi
  local hash stamp
  hash="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
  stamp="$root/.venv/.installed-$hash${extra:+-$extra}"
  # Installed with the dev extra for this pyproject.toml: every need is met.
  if [ -f "$stamp" ] || [ -f "$root/.venv/.installed-$hash-dev" ]; then
    return
  fi
  echo "==> installing dependencies (pyproject.toml${extra:+, extra $extra})"
  "$root/.venv/bin/python" -m pip install -q --upgrade pip
  "$root/.venv/bin/python" -m pip install -q -e "$root${extra:+[$extra]}"
  rm -f "$root"/.venv/.installed-* && touch "$stamp"
}
