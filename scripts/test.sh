#!/usr/bin/env bash
# Installs everything the tests need (Debian packages, the package with its test extras), then runs them.
# Extra arguments go to pytest, e.g. scripts/test.sh -k proxy
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export CHECKOV_BIN="$PWD/.venv-checkov/bin/checkov"
export PATH="$PWD/.venv/bin:$PATH"

# Static checks first; a failing one says in one line how to see or fix its findings.
check() {  # check HINT COMMAND...
  local hint=$1
  shift
  "$@" || { echo "$hint" >&2; exit 1; }
}
check "ruff found problems: run .venv/bin/ruff check --fix bridge scripts tests" .venv/bin/ruff check bridge scripts tests
check "ruff format would change files: run .venv/bin/ruff format bridge scripts tests" .venv/bin/ruff format --check bridge scripts tests
check "mypy found type errors: run .venv/bin/mypy bridge (settings in pyproject.toml [tool.mypy])" .venv/bin/mypy bridge
check "an import breaks the layers: run .venv/bin/lint-imports (contract in pyproject.toml [tool.importlinter])" .venv/bin/lint-imports
check "dependencies and imports differ: run .venv/bin/python scripts/check_deps.py and fix [project] dependencies" .venv/bin/python scripts/check_deps.py

exec .venv/bin/python -m pytest "$@"
