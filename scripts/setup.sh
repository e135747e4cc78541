#!/usr/bin/env bash
# Installs exchange-bridge into ./.venv. With --test, also what the tests need:
# Debian packages (pebble, chromium, shellcheck, haproxy, nginx, wrk, curl, fail2ban, linux-perf) and checkov in its own venv.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

quietly() {  # pip's output only when it fails
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  rm -f "$log"
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# The distribution's python3 when it is recent enough: it is what scripts/install.sh runs the bridge
# on (Debian and Ubuntu build it with profile-guided and link-time optimisation; a python3 built from
# source without them, as pyenv does by default, costs the bridge about 15 % more CPU per request).
default_python=python3
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  default_python=/usr/bin/python3
fi
python=${PYTHON:-$default_python}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "exchange-bridge needs Python 3.11 or newer; set PYTHON=/path/to/python3.11." >&2; exit 2; }

if [ "$want_tests" = 1 ]; then
  packages=(pebble chromium shellcheck haproxy nginx wrk curl openssl iproute2 fail2ban linux-perf)
  missing=()
  for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # nginx and haproxy are run by the benchmark on loopback only, never as system services; fail2ban's
  # regex tool reads the bridge's log lines in a test, its daemon is not needed.
  as_root systemctl disable --now nginx haproxy fail2ban >/dev/null 2>&1 || true
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    # Debian ships venv's pip bootstrap separately.
    rm -rf .venv
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv >/dev/null
    "$python" -m venv .venv
  fi
fi
quietly .venv/bin/pip install --upgrade pip
if [ "$want_tests" = 1 ]; then
  # Runtime dependencies at the versions of constraints.txt; the test extras are not pinned there.
  quietly .venv/bin/pip install -c constraints.txt -e '.[test]'
  if [ ! -x .venv-checkov/bin/checkov ]; then
    "$python" -m venv .venv-checkov
    quietly .venv-checkov/bin/pip install checkov
  fi
else
  quietly .venv/bin/pip install -c constraints.txt -e .
fi
