"""Bridge configuration: flags, an optional TOML file (flags win), and validation.

Every user mistake found here becomes a ``ConfigError`` whose message is one sentence saying what is
wrong and what to do; the CLI prints it and exits 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError

DEFAULT_FORWARD_PATHS = (
    "/owa",
    "/exchange",
    "/exchweb",
    "/public",
    "/EWS",
    "/Autodiscover",
    "/rpc",
    "/OAB",
    "/Microsoft-Server-ActiveSync",
    "/UnifiedMessaging",
)

# Outlook Anywhere keeps channels open with a 900 s server-to-client keep-alive: stay well above it.
DEFAULT_IDLE_TIMEOUT = 30 * 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
# Operations and security (issue 6).
DEFAULT_STATUS_BIND = "127.0.0.1:8404"
DEFAULT_BAN_THRESHOLD = 10
DEFAULT_BAN_WINDOW = 600.0
DEFAULT_BAN_DURATION = 3600.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HEADER_TIMEOUT = 15.0
DEFAULT_DRAIN_TIMEOUT = 30.0

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_FINGERPRINT = re.compile(r"^(?:sha256:)?([0-9A-Fa-f]{2}(?::?[0-9A-Fa-f]{2}){31})$")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LegacyServer:
    host: str
    port: int = 443

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass
class BridgeConfig:
    fqdn: str = ""
    legacy: list[LegacyServer] = field(default_factory=list)
    bind: str | None = None
    https_port: int = 443
    http_port: int = 80
    cert: Path | None = None
    key: Path | None = None
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    legacy_fingerprint: str | None = None  # normalised lower-case hex without colons
    legacy_ca: Path | None = None
    legacy_host_header: str | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    forward_paths: tuple[str, ...] = DEFAULT_FORWARD_PATHS
    log_level: str = "info"
    # ACME (used when no --cert/--key are given)
    acme_directory: str = "letsencrypt"
    acme_email: str | None = None
    acme_eab_kid: str | None = None
    acme_eab_hmac_key: str | None = None
    acme_ca_bundle: Path | None = None
    key_type: str = "ecdsa-p256"
    # Operations and security
    status_bind: str = DEFAULT_STATUS_BIND  # "off" disables the status listener
    ban_threshold: int = DEFAULT_BAN_THRESHOLD
    ban_window: float = DEFAULT_BAN_WINDOW
    ban_duration: float = DEFAULT_BAN_DURATION
    ban_command: str | None = None
    never_ban: tuple[Network, ...] = ()
    allow: tuple[Network, ...] = ()  # empty: every source may connect
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    workers: int = 1  # HTTPS worker processes (bridge.workers); 1 serves in the main process

    @property
    def legacy_hostnames(self) -> set[str]:
        return {server.host.lower() for server in self.legacy}


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/exchange-bridge")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "exchange-bridge"


def validate_fqdn(name: str) -> str:
    candidate = name.strip().rstrip(".").lower()
    if not candidate:
        raise ConfigError("No FQDN given: pass --fqdn with the public name of the bridge, e.g. --fqdn owa-bridge.example.com.")
    if is_ip_address(candidate):
        raise ConfigError(
            f"--fqdn {name} is an IP address; public CAs only certify DNS names, so give a name whose A record points at this machine."
        )
    labels = candidate.split(".")
    if len(candidate) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"--fqdn {name!r} is not a valid fully qualified domain name; use letters, digits and hyphens in dot-separated labels, e.g. owa-bridge.example.com."
        )
    return candidate


def parse_legacy(spec: str) -> LegacyServer:
    """Parse HOST, HOST:PORT, [IPv6] or [IPv6]:PORT."""
    text = spec.strip()
    if text.lower().startswith("https://"):
        text = text[8:].rstrip("/")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"--legacy {spec!r} has an unclosed '['; write an IPv6 address as [2001:db8::1]:443.")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"--legacy {spec!r} is not HOST[:PORT]; write e.g. owa.customer.example:443.")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1 and is_ip_address(text):
        host = text
    port = 443
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"--legacy {spec!r} has an invalid port; use a number from 1 to 65535.")
        port = int(port_text)
    host = host.strip().rstrip(".")
    if not host or not (is_ip_address(host) or all(_LABEL.match(label) for label in host.split("."))):
        raise ConfigError(f"--legacy {spec!r} is not a valid host name or IP address; write e.g. owa.customer.example or 192.0.2.10:443.")
    return LegacyServer(host=host, port=port)


def parse_fingerprint(text: str) -> str:
    match = _FINGERPRINT.match(text.strip())
    if not match:
        raise ConfigError(
            f"--legacy-fingerprint {text!r} is not a SHA-256 fingerprint; write sha256: followed by 64 hex digits (colons allowed), as printed in the bridge's startup warning."
        )
    return match.group(1).replace(":", "").lower()


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _port(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a port number from 1 to 65535, not {value!r}.") from None
    if not 0 <= number < 65536:  # 0 lets tests ask the kernel for a free port
        raise ConfigError(f"{name} must be a port number from 1 to 65535, not {value!r}.")
    return number


def _seconds(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}.") from None
    if number <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}.")
    return number


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist; check the --config path.") from None
    except PermissionError:
        raise ConfigError(f"Config file {path} is not readable by this user; fix its permissions.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML ({exc}); fix that line.") from None
    known = {f.name for f in fields(BridgeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"Config file {path} has unknown setting(s) {', '.join(unknown)}; see the README for the names.")
    return data


def build_config(values: dict[str, Any], *, require_fqdn: bool = True, require_legacy: bool = True) -> BridgeConfig:
    """Validate merged settings (TOML overlaid by flags) into a BridgeConfig."""
    config = BridgeConfig()
    fqdn = values.get("fqdn")
    if fqdn or require_fqdn:
        config.fqdn = validate_fqdn(fqdn or "")
    legacy = values.get("legacy") or []
    if isinstance(legacy, str):
        legacy = [legacy]
    config.legacy = [parse_legacy(item) for item in legacy]
    if require_legacy and not config.legacy:
        raise ConfigError("No legacy server given: pass --legacy with the Exchange 2007 host, e.g. --legacy owa.customer.example.")
    if values.get("bind"):
        config.bind = str(values["bind"])
    if values.get("https_port") is not None:
        config.https_port = _port("--https-port", values["https_port"])
    if values.get("http_port") is not None:
        config.http_port = _port("--http-port", values["http_port"])
    cert, key = values.get("cert"), values.get("key")
    if bool(cert) != bool(key):
        raise ConfigError("--cert and --key go together; give both (the certificate chain and its private key) or neither.")
    if cert and key:
        config.cert, config.key = Path(cert), Path(key)
    if values.get("state_dir"):
        config.state_dir = Path(values["state_dir"])
    if values.get("legacy_fingerprint"):
        config.legacy_fingerprint = parse_fingerprint(str(values["legacy_fingerprint"]))
    if values.get("legacy_ca"):
        config.legacy_ca = Path(values["legacy_ca"])
        if not config.legacy_ca.is_file():
            raise ConfigError(f"--legacy-ca {config.legacy_ca} does not exist; give the PEM file of the CA that signed the legacy certificate.")
    if values.get("legacy_host_header"):
        config.legacy_host_header = str(values["legacy_host_header"])
    if values.get("idle_timeout") is not None:
        config.idle_timeout = _seconds("--idle-timeout", values["idle_timeout"])
    if values.get("connect_timeout") is not None:
        config.connect_timeout = _seconds("--connect-timeout", values["connect_timeout"])
    if values.get("forward_paths"):
        config.forward_paths = tuple(_normalise_prefix(p) for p in values["forward_paths"])
    if values.get("log_level"):
        config.log_level = str(values["log_level"]).lower()
    for name in ("acme_directory", "acme_email", "acme_eab_kid", "acme_eab_hmac_key", "key_type"):
        if values.get(name):
            setattr(config, name, str(values[name]))
    if values.get("acme_ca_bundle"):
        config.acme_ca_bundle = Path(values["acme_ca_bundle"])
        if not config.acme_ca_bundle.is_file():
            raise ConfigError(f"--acme-ca-bundle {config.acme_ca_bundle} does not exist; give the PEM file of the CA that signed the ACME server's certificate.")
    if config.acme_directory.lower() not in ("letsencrypt", "letsencrypt-staging") and not config.acme_directory.startswith(("https://", "http://")):
        raise ConfigError(f"--acme-directory {config.acme_directory!r} is not letsencrypt, letsencrypt-staging or a directory URL; give one of those.")
    if bool(config.acme_eab_kid) != bool(config.acme_eab_hmac_key):
        raise ConfigError("--acme-eab-kid and --acme-eab-hmac-key go together; give both as your CA shows them, or neither.")
    if config.key_type not in ("ecdsa-p256", "rsa-2048", "rsa-3072"):
        raise ConfigError(f"--key-type {config.key_type!r} is not supported; use ecdsa-p256, rsa-2048 or rsa-3072.")
    _operations(config, values)
    return config


def _operations(config: BridgeConfig, values: dict[str, Any]) -> None:
    """Status listener, bans, allow-list and connection limits."""
    if values.get("status_bind"):
        config.status_bind = str(values["status_bind"]).strip()
        parse_status_bind(config.status_bind)
    if values.get("ban_threshold") is not None:
        config.ban_threshold = _count("--ban-threshold", values["ban_threshold"])
    if values.get("ban_window") is not None:
        config.ban_window = _seconds("--ban-window", values["ban_window"])
    if values.get("ban_duration") is not None:
        config.ban_duration = _seconds("--ban-duration", values["ban_duration"])
    if values.get("ban_command"):
        config.ban_command = str(values["ban_command"])
        try:
            shlex.split(config.ban_command)
        except ValueError as exc:
            raise ConfigError(f"--ban-command {config.ban_command!r} is not a command line ({exc}); check its quotes.") from None
    config.never_ban = parse_networks(_as_list(values.get("never_ban")), "--never-ban")
    config.allow = parse_networks(_as_list(values.get("allow")), "--allow")
    if values.get("max_connections") is not None:
        config.max_connections = _count("--max-connections", values["max_connections"])
    if values.get("header_timeout") is not None:
        config.header_timeout = _seconds("--header-timeout", values["header_timeout"])
    if values.get("drain_timeout") is not None:
        config.drain_timeout = _seconds("--drain-timeout", values["drain_timeout"])
    if values.get("workers") is not None:
        config.workers = parse_workers(values["workers"])


def parse_workers(value: Any) -> int:
    """--workers: a whole number from 1 to 64, or auto (one per CPU)."""
    if str(value).strip().lower() == "auto":
        return max(1, min(os.cpu_count() or 1, 64))
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if not 1 <= number <= 64:
        raise ConfigError(f"--workers must be a whole number from 1 to 64 or auto, not {value!r}.")
    return number


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _count(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number, not {value!r}.") from None
    if number < 1:
        raise ConfigError(f"{name} must be at least 1, not {value!r}.")
    return number


def parse_networks(values: list[Any], flag: str) -> tuple[Network, ...]:
    """Addresses or CIDR ranges, e.g. 203.0.113.7 or 40.96.0.0/13."""
    networks = []
    for value in values:
        text = str(value).strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is not an address or CIDR range; write e.g. 203.0.113.7 or 40.96.0.0/13.") from None
    return tuple(networks)


def parse_status_bind(text: str) -> tuple[str, int] | None:
    """HOST:PORT, [IPv6]:PORT or PORT (on 127.0.0.1); None for "off"."""
    value = text.strip()
    if value.lower() in ("off", "none", "no"):
        return None
    host, port_text = "127.0.0.1", value
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif ":" in value:
        host, _, port_text = value.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536 or not host or not (is_ip_address(host) or host == "localhost"):
        raise ConfigError(f"--status-bind {text!r} is not ADDRESS:PORT; write e.g. 127.0.0.1:8404, or off to disable the status page.")
    return host, int(port_text)


def _normalise_prefix(prefix: str) -> str:
    text = "/" + str(prefix).strip().strip("/")
    if text == "/":
        raise ConfigError("forward_paths may not contain '/', which would forward everything; list the Exchange virtual directories instead.")
    return text


def merge(file_values: dict[str, Any], flag_values: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line win over the file; unset flags (None/empty) do not."""
    merged = dict(file_values)
    for key, value in flag_values.items():
        if value is None or value == [] or value == ():
            continue
        merged[key] = value
    return merged
