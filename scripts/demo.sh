#!/usr/bin/env bash
# Installs exchange-bridge into ./.venv and runs `bridge demo`: the lab (a simulated Exchange 2007)
# with the bridge in front of it, on 127.0.0.1. Extra arguments go to `bridge demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/bridge demo "$@"
