"""Where the deployment files are, and a reader for the systemd unit, for the deployment tests."""

from __future__ import annotations

from support import REPO

TERRAFORM = REPO / "terraform"
AZURE = TERRAFORM / "azure"
SCRIPTS = REPO / "scripts"
INSTALL_SH = SCRIPTS / "install.sh"
UNIT_TEMPLATE = SCRIPTS / "exchange-bridge.service"


def unit_directives(text: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return directives
