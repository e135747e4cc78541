#!/usr/bin/env bash
# Installs everything the tests need (Debian packages, the package with its test extras), then runs them.
# Extra arguments go to pytest, e.g. scripts/test.sh -k proxy
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export CHECKOV_BIN="$PWD/.venv-checkov/bin/checkov"
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
