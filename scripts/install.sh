#!/usr/bin/env bash
# Install exchange-bridge on a Debian 12 / Ubuntu 24.04 machine (or re-run it to upgrade or repair).
#
#   sudo scripts/install.sh --fqdn bridge.example.com --legacy mail.customer.example \
#        --email ops@example.com [--legacy-fingerprint sha256:HEX] [--package SPEC]
#
# What it does, each step only when needed (so it can be run again at any time):
#   - a system user and group `exchange-bridge` (no login, no home of its own);
#   - a virtual environment /opt/exchange-bridge/venv with the bridge installed by pip from SPEC
#     (a released version, `exchange-bridge @ git+https://...`, a wheel URL or a local checkout),
#     its dependencies at the exact versions of constraints.txt (beside this script, as cloud-init
#     writes it, or at the root of the checkout this script is in);
#   - /usr/local/bin/bridge, a link to the venv's `bridge`;
#   - /etc/exchange-bridge/bridge.toml (0640 root:exchange-bridge), written only when it does not exist
#     yet or with --overwrite-config;
#   - /etc/systemd/system/exchange-bridge.service (from exchange-bridge.service beside this script),
#     enabled and (re)started.
# Terraform's cloud-init (terraform/azure) runs this same script.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"  # useradd, also from cloud-init's environment

PROG=install.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVICE_USER=exchange-bridge
UNIT_NAME=exchange-bridge.service

PREFIX=/
PACKAGE=
CONSTRAINTS=
PYTHON=python3
PYTHON_GIVEN=no
FQDN=
LEGACY=()
EMAIL=
FINGERPRINT=
ACME_DIRECTORY=
EXPIRE_AT=
EXPIRE_AFTER=
OVERWRITE_CONFIG=no
USE_SYSTEMD=yes
START=yes
USE_APT=yes

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    cat <<'EOF'
Usage: install.sh [options]

Settings written to /etc/exchange-bridge/bridge.toml (needed the first time, or with --overwrite-config):
  --fqdn NAME                 public name of the bridge, e.g. bridge.example.com
  --legacy HOST[:PORT]        Exchange 2007 server behind the bridge (repeatable)
  --email ADDRESS             contact e-mail for the Let's Encrypt account
  --legacy-fingerprint sha256:HEX
                              pin the legacy server's certificate (see `bridge preflight`)
  --acme-directory DIR        letsencrypt (default) | letsencrypt-staging | https://... directory URL
  --expire-at DATE            end of the migration window: ISO 8601 date (end of that day, UTC)
                              or date-time, e.g. 2025-07-01 or 2025-07-01T18:00Z
  --expire-after DURATION     ...or its length from the bridge's first start, e.g. 14d or 72h
  --overwrite-config          replace an existing bridge.toml

Installation:
  --package SPEC              pip requirement to install, e.g. 'exchange-bridge==0.1.0',
                              'exchange-bridge @ git+https://host/org/exchange-bridge@v0.1.0',
                              a wheel URL or a local directory
                              (default: the checkout this script is in, if it is in one)
  --constraints FILE          pip constraints: the exact dependency versions to install, or 'none'
                              (default: constraints.txt beside this script or in its checkout)
  --python PATH               Python 3.11 or newer for the venv (default: python3)
  --prefix DIR                install below DIR instead of / (a throwaway root, for tests);
                              implies --no-systemd
  --no-systemd                write the unit file but do not call systemctl
  --no-start                  enable the service but do not (re)start it
  --no-apt                    never call apt-get (python3-venv and git must be present)
  -h, --help                  this text
EOF
}

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value; see --help."; fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --fqdn) need_value "$@"; FQDN=$2; shift 2 ;;
        --legacy) need_value "$@"; LEGACY+=("$2"); shift 2 ;;
        --email) need_value "$@"; EMAIL=$2; shift 2 ;;
        --legacy-fingerprint) need_value "$@"; FINGERPRINT=$2; shift 2 ;;
        --acme-directory) need_value "$@"; ACME_DIRECTORY=$2; shift 2 ;;
        --expire-at) need_value "$@"; EXPIRE_AT=$2; shift 2 ;;
        --expire-after) need_value "$@"; EXPIRE_AFTER=$2; shift 2 ;;
        --overwrite-config) OVERWRITE_CONFIG=yes; shift ;;
        --package) need_value "$@"; PACKAGE=$2; shift 2 ;;
        --constraints) need_value "$@"; CONSTRAINTS=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON=$2; PYTHON_GIVEN=yes; shift 2 ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --no-systemd) USE_SYSTEMD=no; shift ;;
        --no-start) START=no; shift ;;
        --no-apt) USE_APT=no; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1'; see --help." ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...): it creates a system user and writes below /opt, /etc and /usr/local."

# ---------------------------------------------------------------- paths
case "$PREFIX" in
    /) ROOT= ;;
    /*) ROOT=${PREFIX%/}; USE_SYSTEMD=no ;;
    *) die "--prefix must be an absolute path, not '$PREFIX'." ;;
esac
OPT_DIR=$ROOT/opt/exchange-bridge
VENV=$OPT_DIR/venv
BIN_LINK=$ROOT/usr/local/bin/bridge
ETC_DIR=$ROOT/etc/exchange-bridge
CONFIG=$ETC_DIR/bridge.toml
UNIT_TEMPLATE=$SCRIPT_DIR/exchange-bridge.service
UNIT_FILE=$ROOT/etc/systemd/system/$UNIT_NAME

[ -f "$UNIT_TEMPLATE" ] || die "$UNIT_TEMPLATE is missing; keep exchange-bridge.service beside install.sh."

if [ -z "$PACKAGE" ]; then
    if [ -f "$SCRIPT_DIR/../pyproject.toml" ] && grep -q '^name = "exchange-bridge"' "$SCRIPT_DIR/../pyproject.toml"; then
        PACKAGE=$(cd "$SCRIPT_DIR/.." && pwd)
    else
        die "no --package given and this script is not in an exchange-bridge checkout; pass e.g. --package 'exchange-bridge==0.1.0'."
    fi
fi

# The dependency versions the release was tested with (constraints.txt at the repository's root).
if [ -z "$CONSTRAINTS" ]; then
    for candidate in "$SCRIPT_DIR/constraints.txt" "$SCRIPT_DIR/../constraints.txt"; do
        if [ -f "$candidate" ]; then CONSTRAINTS=$(cd "$(dirname "$candidate")" && pwd)/constraints.txt; break; fi
    done
fi
pip_constraints=()
case "$CONSTRAINTS" in
    "" | none) ;;
    *) [ -f "$CONSTRAINTS" ] || die "--constraints $CONSTRAINTS: no such file."; pip_constraints=(--constraint "$CONSTRAINTS") ;;
esac

# ---------------------------------------------------------------- validate the settings
FQDN_RE='^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'
LEGACY_RE='^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(:[0-9]{1,5})?$'
EMAIL_RE='^[A-Za-z0-9.!#$%&*+/=?^_`{|}~-]+@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$'
FINGERPRINT_RE='^(sha256:)?[0-9A-Fa-f]{2}(:?[0-9A-Fa-f]{2}){31}$'
ACME_RE='^(letsencrypt|letsencrypt-staging|https://[^[:space:]"\\]+)$'
EXPIRE_AT_RE='^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2})?(Z|[+-][0-9]{2}:[0-9]{2})?)?$'
EXPIRE_AFTER_RE='^([0-9]+[smhdw])+$'

FQDN=$(printf '%s' "$FQDN" | tr '[:upper:]' '[:lower:]')
FQDN=${FQDN%.}
[ -z "$FQDN" ] || [[ "$FQDN" =~ $FQDN_RE ]] || die "--fqdn '$FQDN' is not a fully qualified domain name such as bridge.example.com."
for host in ${LEGACY[@]+"${LEGACY[@]}"}; do
    [[ "$host" =~ $LEGACY_RE ]] || die "--legacy '$host' is not HOST[:PORT] such as mail.customer.example or 192.0.2.10:443."
done
[ -z "$EMAIL" ] || [[ "$EMAIL" =~ $EMAIL_RE ]] || die "--email '$EMAIL' is not an e-mail address."
[ -z "$FINGERPRINT" ] || [[ "$FINGERPRINT" =~ $FINGERPRINT_RE ]] || die "--legacy-fingerprint '$FINGERPRINT' is not sha256: followed by 64 hex digits."
[ -z "$ACME_DIRECTORY" ] || [[ "$ACME_DIRECTORY" =~ $ACME_RE ]] || die "--acme-directory '$ACME_DIRECTORY' is not letsencrypt, letsencrypt-staging or an https:// URL."
[ -z "$EXPIRE_AT" ] || [[ "$EXPIRE_AT" =~ $EXPIRE_AT_RE ]] || die "--expire-at '$EXPIRE_AT' is not an ISO 8601 date or date-time such as 2025-07-01 or 2025-07-01T18:00Z."
[ -z "$EXPIRE_AFTER" ] || [[ "$EXPIRE_AFTER" =~ $EXPIRE_AFTER_RE ]] || die "--expire-after '$EXPIRE_AFTER' is not a duration such as 14d, 72h or 90m."
[ -z "$EXPIRE_AT" ] || [ -z "$EXPIRE_AFTER" ] || die "give --expire-at or --expire-after, not both: each sets the end of the migration window."

WRITE_CONFIG=no
if [ ! -e "$CONFIG" ] || [ "$OVERWRITE_CONFIG" = yes ]; then
    WRITE_CONFIG=yes
    [ -n "$FQDN" ] || die "$CONFIG is to be written: give --fqdn (the bridge's public name)."
    [ "${#LEGACY[@]}" -gt 0 ] || die "$CONFIG is to be written: give --legacy (the Exchange 2007 server), once per server."
elif [ -n "$FQDN$EMAIL$FINGERPRINT$ACME_DIRECTORY$EXPIRE_AT$EXPIRE_AFTER" ] || [ "${#LEGACY[@]}" -gt 0 ]; then
    say "keeping the existing $CONFIG; pass --overwrite-config to replace it with the settings given."
fi

# ---------------------------------------------------------------- packages from apt
apt_packages=()
if [ "$PYTHON_GIVEN" = no ] && command -v dpkg-query >/dev/null; then
    for pkg in python3 python3-venv; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || apt_packages+=("$pkg")
    done
fi
if [[ "$PACKAGE" == *git+* ]] && ! command -v git >/dev/null; then
    apt_packages+=(git)
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
    if [ "$USE_APT" = no ] || ! command -v apt-get >/dev/null; then
        die "missing: ${apt_packages[*]}; install them (or drop --no-apt) and run again."
    fi
    say "installing ${apt_packages[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for the dpkg lock rather than fail: on a fresh VM, unattended-upgrades may hold it.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${apt_packages[@]}"
fi

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or newer or pass --python."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$("$PYTHON" -V 2>&1) is too old: the bridge needs Python 3.11 or newer (Debian 12, Ubuntu 24.04)."

# ---------------------------------------------------------------- user and group
user_exists() {
    if [ -z "$ROOT" ]; then
        getent passwd "$SERVICE_USER" >/dev/null
    else
        [ -f "$ROOT/etc/passwd" ] && awk -F: -v u="$SERVICE_USER" '$1 == u { found = 1 } END { exit !found }' "$ROOT/etc/passwd"
    fi
}
if user_exists; then
    say "user $SERVICE_USER exists"
else
    say "creating system user $SERVICE_USER"
    useradd_args=(--system --user-group --home-dir /var/lib/exchange-bridge --no-create-home
        --shell /usr/sbin/nologin --comment "exchange-bridge service")
    if [ -n "$ROOT" ]; then
        mkdir -p "$ROOT/etc"
        useradd_args+=(--prefix "$ROOT")
    fi
    useradd "${useradd_args[@]}" "$SERVICE_USER"
fi
if [ -z "$ROOT" ]; then
    SERVICE_GID=$(getent group "$SERVICE_USER" | cut -d: -f3)
else
    SERVICE_GID=$(awk -F: -v g="$SERVICE_USER" '$1 == g { print $3 }' "$ROOT/etc/group")
fi
[ -n "$SERVICE_GID" ] || die "group $SERVICE_USER is missing; create it (groupadd --system $SERVICE_USER) and run again."

# ---------------------------------------------------------------- venv and package
install -d -m 0755 "$OPT_DIR"
if "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "using the existing venv $VENV"
else
    say "creating the venv $VENV"
    "$PYTHON" -m venv --clear "$VENV" || die "could not create a venv with $PYTHON; on Debian/Ubuntu install python3-venv."
fi
say "installing $PACKAGE${pip_constraints[*]:+ with the versions of $CONSTRAINTS}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --upgrade ${pip_constraints[@]+"${pip_constraints[@]}"} "$PACKAGE"
[ -x "$VENV/bin/bridge" ] || die "$PACKAGE installed no 'bridge' command into $VENV; is it exchange-bridge?"
say "installed $("$VENV/bin/bridge" --version)"

install -d -m 0755 "$(dirname "$BIN_LINK")"
ln -sfn "$VENV/bin/bridge" "$BIN_LINK"

# ---------------------------------------------------------------- bridge.toml
install -d -m 0750 -o 0 -g "$SERVICE_GID" "$ETC_DIR"
if [ "$WRITE_CONFIG" = yes ]; then
    tmp=$(mktemp "$ETC_DIR/.bridge.toml.XXXXXX")
    trap 'rm -f "$tmp"' EXIT
    {
        echo "# exchange-bridge settings, written by install.sh on $(date -u +%Y-%m-%d)."
        echo "# Keys are the 'bridge up' flags with underscores (see README); apply changes with"
        echo "#   systemctl restart exchange-bridge"
        printf 'fqdn = "%s"\n' "$FQDN"
        printf 'legacy = ['
        sep=
        for host in "${LEGACY[@]}"; do printf '%s"%s"' "$sep" "$host"; sep=', '; done
        printf ']\n'
        [ -z "$EMAIL" ] || printf 'acme_email = "%s"\n' "$EMAIL"
        [ -z "$ACME_DIRECTORY" ] || printf 'acme_directory = "%s"\n' "$ACME_DIRECTORY"
        [ -z "$FINGERPRINT" ] || printf 'legacy_fingerprint = "%s"\n' "$FINGERPRINT"
        [ -z "$EXPIRE_AT" ] || printf 'expire_at = "%s"\n' "$EXPIRE_AT"
        [ -z "$EXPIRE_AFTER" ] || printf 'expire_after = "%s"\n' "$EXPIRE_AFTER"
    } >"$tmp"
    # Let the installed bridge check the file before it goes live.
    "$VENV/bin/python" - "$tmp" <<'EOF' || die "the settings given were refused (see above); nothing was changed."
import sys
from pathlib import Path
from bridge.config import ConfigError, build_config, load_toml

try:
    build_config(load_toml(Path(sys.argv[1])))
except ConfigError as exc:
    sys.exit(f"install.sh: error: {exc}")
EOF
    chown "0:$SERVICE_GID" "$tmp"
    chmod 0640 "$tmp"
    mv -f "$tmp" "$CONFIG"
    trap - EXIT
    say "wrote $CONFIG"
fi

# ---------------------------------------------------------------- systemd unit
install -d -m 0755 "$(dirname "$UNIT_FILE")"
unit_tmp=$(mktemp)
if [ -n "$ROOT" ]; then
    sed -e "s|/opt/exchange-bridge/|$ROOT/opt/exchange-bridge/|g" \
        -e "s|/etc/exchange-bridge/|$ROOT/etc/exchange-bridge/|g" "$UNIT_TEMPLATE" >"$unit_tmp"
else
    cp "$UNIT_TEMPLATE" "$unit_tmp"
fi
if cmp -s "$unit_tmp" "$UNIT_FILE"; then
    rm -f "$unit_tmp"
else
    install -m 0644 "$unit_tmp" "$UNIT_FILE"
    rm -f "$unit_tmp"
    say "wrote $UNIT_FILE"
fi

if [ "$USE_SYSTEMD" = yes ] && [ ! -d /run/systemd/system ]; then
    say "systemd is not running here; not enabling the service."
    USE_SYSTEMD=no
fi
if [ "$USE_SYSTEMD" = yes ]; then
    systemctl daemon-reload
    systemctl enable --quiet "$UNIT_NAME"
    if [ "$START" = yes ]; then
        systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
        systemctl restart "$UNIT_NAME"
        say "started $UNIT_NAME; follow it with: journalctl -u exchange-bridge -f"
    else
        say "enabled $UNIT_NAME; start it with: systemctl start exchange-bridge"
    fi
else
    say "systemctl not called; on the target: systemctl daemon-reload && systemctl enable --now exchange-bridge"
fi

say "done. Next: point the DNS A record of the bridge's name at this machine, then run"
say "  sudo bridge preflight --config /etc/exchange-bridge/bridge.toml"
