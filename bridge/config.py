"""Bridge configuration: flags, an optional TOML file (flags win), and validation.

Every setting is declared once, as a field of ``BridgeConfig`` with its flag, TOML key (the field's
name), parser, default, help text, group and whether SIGHUP applies it (``SETTINGS`` is that table).
The argparse arguments of `bridge up` and `bridge cert`, the TOML validation, the reload and restart
lists and the README's options tables are all made from it.

Every user mistake found here becomes a ``ConfigError`` whose message is one sentence saying what is
wrong and what to do; the CLI prints it and exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import ipaddress
import os
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
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

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_FINGERPRINT = re.compile(r"^(?:sha256:)?([0-9A-Fa-f]{2}(?::?[0-9A-Fa-f]{2}){31})$")
KEY_TYPES = ("ecdsa-p256", "rsa-2048", "rsa-3072")
# --allow keywords: named address lists expanded by bridge.ops.allowlist (kept as the word in the configuration).
EXCHANGE_ONLINE = "exchange-online"
ALLOW_KEYWORDS = (EXCHANGE_ONLINE,)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LegacyServer:
    host: str
    port: int = 443

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/exchange-bridge")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "exchange-bridge"


# --------------------------------------------------------------------------- addresses and names


def public_origin(fqdn: str, port: int) -> str:
    """The bridge's public https origin: https://FQDN, with :PORT unless it is 443."""
    return f"https://{fqdn}" + ("" if port == 443 else f":{port}")


def plain_address(text: str) -> str:
    """An address as the bridge compares and stores it: an IPv4-mapped IPv6 address (how a dual-stack
    listener reports an IPv4 peer, ``::ffff:192.0.2.1``) becomes the IPv4 address; anything else is
    returned unchanged."""
    if text.startswith("::ffff:") and "." in text:  # the kernel's spelling: no parsing on the request path
        return text[7:]
    if ":" in text and "ffff" in text.lower():
        try:
            mapped = ipaddress.IPv6Address(text).ipv4_mapped
        except ValueError:
            return text
        if mapped is not None:
            return str(mapped)
    return text


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- parsers (one value of one setting)


def validate_fqdn(name: str) -> str:
    candidate = name.strip().rstrip(".").lower()
    if not candidate:
        raise ConfigError("No FQDN given: pass --fqdn with the public name of the bridge, e.g. --fqdn owa-bridge.example.com.")
    if is_ip_address(candidate):
        raise ConfigError(f"--fqdn {name} is an IP address; public CAs only certify DNS names, so give a name whose A record points at this machine.")
    labels = candidate.split(".")
    if len(candidate) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(f"--fqdn {name!r} is not a valid fully qualified domain name; use letters, digits and hyphens in dot-separated labels, e.g. owa-bridge.example.com.")
    return candidate


def parse_legacy(spec: str, flag: str = "--legacy", default_port: int = 443) -> LegacyServer:
    """Parse HOST, HOST:PORT, [IPv6] or [IPv6]:PORT (``flag`` names the setting in the error sentences)."""
    text = spec.strip()
    if text.lower().startswith("https://"):
        text = text[8:].rstrip("/")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{flag} {spec!r} has an unclosed '['; write an IPv6 address as [2001:db8::1]:443.")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{flag} {spec!r} is not HOST[:PORT]; write e.g. owa.customer.example:443.")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1 and is_ip_address(text):
        host = text
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{flag} {spec!r} has an invalid port; use a number from 1 to 65535.")
        port = int(port_text)
    host = host.strip().rstrip(".")
    if not host or not (is_ip_address(host) or all(_LABEL.match(label) for label in host.split("."))):
        raise ConfigError(f"{flag} {spec!r} is not a valid host name or IP address; write e.g. owa.customer.example or 192.0.2.10:443.")
    return LegacyServer(host=host, port=port)


@dataclass(frozen=True)
class PassthroughRoute:
    """--passthrough NAME=HOST:PORT[+proxy]: TLS for NAME (``*.domain``: any name under it; ``*``: every
    other name and no name) goes to HOST:PORT undecrypted; ``proxy``: a PROXY v2 header first."""

    name: str
    host: str
    port: int = 443
    proxy_protocol: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.name}={host}:{self.port}" + ("+proxy" if self.proxy_protocol else "")

    @property
    def backend(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_route_name(flag: str, text: str, *, default_allowed: bool = False) -> str:
    """A routed name: a host name, ``*.domain`` (every name under it), or ``*`` (the default) when allowed; lower case."""
    name = str(text).strip().rstrip(".").lower()
    if name == "*" and default_allowed:
        return name
    labels = (name[2:] if name.startswith("*.") else name).split(".")
    if not name or is_ip_address(name) or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        example = "mail.example.com, *.example.com or * (every other name)" if default_allowed else "mail.example.com or *.example.com"
        raise ConfigError(f"{flag} {text!r} is not a host name or wildcard; write e.g. {example}.")
    return name


def parse_passthrough(flag: str, value: Any) -> PassthroughRoute:
    spec = str(value).strip()
    name, equals, target = spec.partition("=")
    if not equals or not name.strip() or not target.strip():
        raise ConfigError(f"{flag} {spec!r} is not NAME=HOST:PORT; write e.g. {flag} mail.example.com=10.0.0.5:443, or *=HOST:PORT for every other name.")
    target, plus, option = target.strip().partition("+")
    if plus and option.strip().lower() != "proxy":
        raise ConfigError(f"{flag} {spec!r} ends in +{option}, which is not an option; the only one is +proxy (send a PROXY v2 header to the backend).")
    try:
        server = parse_legacy(target)
    except ConfigError:
        raise ConfigError(f"{flag} {spec!r} does not name a backend as HOST:PORT; write e.g. {flag} mail.example.com=10.0.0.5:443.") from None
    return PassthroughRoute(parse_route_name(flag, name, default_allowed=True), server.host, server.port, bool(plus))


def check_routes(config: Any) -> None:
    """The routes of ``config`` against each other and the bridge's own names: one sentence for a name
    routed twice or the bridge's own name listed as passthrough."""
    own = {config.fqdn, *config.terminate} - {""}
    seen: dict[str, PassthroughRoute] = {}
    for route in config.passthrough:
        if route.name in seen:
            raise ConfigError(f"--passthrough routes {route.name} twice (to {seen[route.name].backend} and to {route.backend}); keep one of them.")
        if route.name in own:
            which = "--fqdn" if route.name == config.fqdn else "--terminate"
            raise ConfigError(f"--passthrough {route} names the bridge's own name {route.name} ({which}), which the bridge terminates itself; remove the route or the name.")
        seen[route.name] = route
    if config.terminate and not config.passthrough:
        raise ConfigError("--terminate only matters beside --passthrough routes (without them the bridge terminates every name); add the routes or remove --terminate.")


def parse_fingerprint(text: str) -> str:
    match = _FINGERPRINT.match(text.strip())
    if not match:
        raise ConfigError(f"--legacy-fingerprint {text!r} is not a SHA-256 fingerprint; write sha256: followed by 64 hex digits (colons allowed), as printed in the bridge's startup warning.")
    return match.group(1).replace(":", "").lower()


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


# A setting's parser: (its flag, for the message; the value from a flag or the TOML file) -> the value kept.
Parser = Callable[[str, Any], Any]


def _text(flag: str, value: Any) -> str:
    return str(value)


def _path(flag: str, value: Any) -> Path:
    return Path(value)


def _lower(flag: str, value: Any) -> str:
    return str(value).lower()


def _number(flag: str, value: Any, kind: Callable[[Any], Any], ok: Callable[[Any], bool], wanted: str, bounds: str) -> Any:
    """``value`` as ``kind`` when ``ok`` says it is in range; else one ConfigError sentence naming ``flag``."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be {wanted}, not {value!r}.") from None
    if not ok(number):
        raise ConfigError(f"{flag} must be {bounds}, not {value!r}.")
    return number


def _port(flag: str, value: Any) -> int:
    # 0 lets tests ask the kernel for a free port
    return int(_number(flag, value, int, lambda n: 0 <= n < 65536, "a port number from 1 to 65535", "a port number from 1 to 65535"))


def _seconds(flag: str, value: Any) -> float:
    return float(_number(flag, value, float, lambda n: n > 0, "a number of seconds", "a positive number of seconds"))


def _count(flag: str, value: Any) -> int:
    return int(_number(flag, value, int, lambda n: n >= 1, "a whole number", "at least 1"))


def _ca_file(signed: str) -> Parser:
    def parse(flag: str, value: Any) -> Path:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{flag} {path} does not exist; give the PEM file of the CA that signed {signed}.")
        return path

    return parse


def _network(flag: str, value: Any) -> Network:
    """An address or CIDR range, e.g. 203.0.113.7 or 40.96.0.0/13."""
    text = str(value).strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not an address or CIDR range; write e.g. 203.0.113.7 or 40.96.0.0/13.") from None


def _allow_source(flag: str, value: Any) -> Network | str:
    """An --allow entry: an address or CIDR range, or a keyword such as exchange-online."""
    text = str(value).strip()
    if text.lower() in ALLOW_KEYWORDS:
        return text.lower()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not an address, a CIDR range or {EXCHANGE_ONLINE}; write e.g. 203.0.113.7, 40.96.0.0/13 or {EXCHANGE_ONLINE}.") from None


def parse_duration(flag: str, value: Any) -> float:
    """A duration such as 90m, 72h, 14d, 2w or 1d12h, in seconds (a unit is required: 72 alone is ambiguous)."""
    text = str(value).strip()
    compact = text.replace(" ", "")
    pieces = _DURATION.findall(compact)
    if not pieces or "".join(number + unit for number, unit in pieces) != compact:
        raise ConfigError(f"{flag} {text!r} is not a duration; write a number with a unit, e.g. 90m, 72h or 14d.")
    seconds = sum(float(number) * _DURATION_UNITS[unit.lower()] for number, unit in pieces)
    if seconds <= 0:
        raise ConfigError(f"{flag} {text!r} is not a positive duration; write e.g. 72h or 14d.")
    return seconds


def parse_expire_at(flag: str, value: Any) -> dt.datetime:
    """An ISO 8601 date or date-time, as an aware UTC datetime. A date alone means the end of that day
    (midnight UTC after it); a date-time without a zone is UTC. TOML's own date and date-time values
    are taken as they are."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        return dt.datetime.combine(value + dt.timedelta(days=1), dt.time(), dt.UTC)
    else:
        text = str(value).strip()
        try:
            if len(text) == 10:
                return parse_expire_at(flag, dt.date.fromisoformat(text))
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is not an ISO 8601 date or date-time; write e.g. 2025-07-01 (the end of that day, UTC) or 2025-07-01T18:00Z.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def format_moment(moment: dt.datetime) -> str:
    """A deadline as logs, answers and the status page show it: 2025-07-01 18:00 UTC (seconds when there are any)."""
    utc = moment.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%d %H:%M:%S UTC" if utc.second else "%Y-%m-%d %H:%M UTC")


def _forward_path(flag: str, prefix: Any) -> str:
    text = "/" + str(prefix).strip().strip("/")
    if text == "/":
        raise ConfigError("forward_paths may not contain '/', which would forward everything; list the Exchange virtual directories instead.")
    return text


def _acme_directory(flag: str, value: Any) -> str:
    text = str(value)
    if text.lower() not in ("letsencrypt", "letsencrypt-staging") and not text.startswith(("https://", "http://")):
        raise ConfigError(f"{flag} {text!r} is not letsencrypt, letsencrypt-staging or a directory URL; give one of those.")
    return text


def _key_type(flag: str, value: Any) -> str:
    text = str(value)
    if text not in KEY_TYPES:
        raise ConfigError(f"{flag} {text!r} is not supported; use ecdsa-p256, rsa-2048 or rsa-3072.")
    return text


def _upstream(flag: str, value: Any) -> LegacyServer:
    """HOST[:PORT] of a mail service; port 0 when none is given (the protocol's port for its TLS mode)."""
    return parse_legacy(str(value), flag, default_port=0)


def _mail_tls(flag: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text not in MAIL_TLS_MODES:
        raise ConfigError(f"{flag} {value!r} is not implicit, starttls or plain; give one of those.")
    return text


def _status_bind(flag: str, value: Any) -> str:
    text = str(value).strip()
    parse_status_bind(text)
    return text


def _command_line(flag: str, value: Any) -> str:
    text = str(value)
    try:
        shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r} is not a command line ({exc}); check its quotes.") from None
    return text


# --------------------------------------------------------------------------- the settings


# Groups: the argparse group title (None: the command's own options) and the README table each goes in.
GROUPS = {
    "up": None,
    "certificates": "certificates (ACME, when no --cert/--key)",
    "operations": "operations and security",
    "mail": "mail protocols",
    "routing": "SNI routing (TLS passthrough beside the bridge)",
}
MAIL_TLS_MODES = ("implicit", "starttls", "plain")
IMAPS_PORT = 993  # the IMAPS port clients expect (RFC 8314); --imaps-port is off unless set
IMAP_PORT = 143
POP3S_PORT = 995
POP3_PORT = 110
SMTPS_PORT = 465
SUBMISSION_PORT = 587  # Exchange 2007's client receive connector (STARTTLS); it has no implicit-TLS SMTP
# Each mail protocol's upstream port when --*-upstream names none: (with implicit TLS, with starttls or plain).
MAIL_UPSTREAM_PORTS = {"imap": (IMAPS_PORT, IMAP_PORT), "pop3": (POP3S_PORT, POP3_PORT), "smtp": (SMTPS_PORT, SUBMISSION_PORT)}


@dataclass(frozen=True)
class Setting:
    """One setting of `bridge up`: the BridgeConfig field and TOML key ``name``, its flag and the rest."""

    name: str
    flag: str
    metavar: str
    help: str  # Markdown (backticks); argparse shows it without them
    parse: Parser
    default: Any
    shown_default: str  # the default as the help and the README state it
    reload: bool  # SIGHUP applies it to the running bridge; otherwise it needs a restart
    repeatable: bool
    group: str
    commands: tuple[str, ...]  # the commands taking the flag: "up", "cert"
    toml: bool  # a key of the TOML file (--config itself is not)

    def help_line(self) -> str:
        default = "required" if self.shown_default == "required" else f"default: {self.shown_default}"
        repeatable = "repeatable; " if self.repeatable else ""
        return f"{self.help} ({repeatable}{default})".replace("`", "").replace("%", "%%")


def _setting(
    default: Any,
    flag: str,
    metavar: str,
    help: str,
    *,
    parse: Parser = _text,
    shown: str | None = None,
    reload: bool = False,
    repeatable: bool = False,
    group: str = "up",
    commands: tuple[str, ...] = ("up",),
    toml: bool = True,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A BridgeConfig field carrying its row of the settings table (see SETTINGS)."""
    row = dict(flag=flag, metavar=metavar, help=help, parse=parse, shown_default=shown, reload=reload, repeatable=repeatable, group=group, commands=commands, toml=toml)
    if factory is not None:
        return field(default_factory=factory, metadata={"setting": row})
    return field(default=default, metadata={"setting": row})


_BOTH = ("up", "cert")


@dataclass
class BridgeConfig:
    fqdn: str = _setting(
        "", "--fqdn", "NAME", "public name of the bridge (Exchange Online's \"RPC proxy server\")", parse=lambda flag, value: validate_fqdn(str(value)), shown="required", commands=_BOTH
    )
    legacy: list[LegacyServer] = _setting(
        None,
        "--legacy",
        "HOST[:PORT]",
        "Exchange 2007 CAS; several are used round robin per client connection, with failover on connect failure (never inside a request)",
        parse=lambda flag, value: parse_legacy(str(value)),
        shown="required",
        repeatable=True,
        factory=list,
    )
    bind: str | None = _setting(None, "--bind", "ADDR", "listening address", shown="all addresses", commands=_BOTH)
    https_port: int = _setting(443, "--https-port", "N", "HTTPS port", parse=_port)
    http_port: int = _setting(80, "--http-port", "N", "HTTP port: redirects to https and answers ACME HTTP-01 challenges", parse=_port, commands=_BOTH)
    cert: Path | None = _setting(
        None, "--cert", "FILE", "serve this certificate chain (e.g. certbot's fullchain.pem) instead of one from ACME; re-read on SIGHUP", parse=_path, shown="ACME", reload=True
    )
    key: Path | None = _setting(None, "--key", "FILE", "the private key of --cert (e.g. certbot's privkey.pem)", parse=_path, shown="ACME", reload=True)
    state_dir: Path = _setting(
        None, "--state-dir", "DIR", "certificates and state", parse=_path, commands=_BOTH, factory=default_state_dir, shown="`/var/lib/exchange-bridge` (root), else `$XDG_STATE_HOME/exchange-bridge`"
    )
    legacy_fingerprint: str | None = _setting(  # normalised lower-case hex without colons
        None,
        "--legacy-fingerprint",
        "sha256:HEX",
        "pin the legacy certificate (the startup warning prints the exact flag)",
        parse=lambda flag, value: parse_fingerprint(str(value)),
    )
    legacy_ca: Path | None = _setting(None, "--legacy-ca", "FILE", "verify the legacy certificate against this CA instead", parse=_ca_file("the legacy certificate"))
    legacy_host_header: str | None = _setting(None, "--legacy-host-header", "NAME", "Host header sent to the legacy server", shown="client's Host")
    idle_timeout: float = _setting(
        30 * 60.0,
        "--idle-timeout",
        "S",  # Outlook Anywhere keeps channels open with a 900 s keep-alive: stay well above it
        "seconds without a byte moving, either way, before a connection closes (Outlook Anywhere's keep-alive is 900 s)",
        parse=_seconds,
        reload=True,
    )
    connect_timeout: float = _setting(10.0, "--connect-timeout", "S", "seconds to connect to the legacy server", parse=_seconds, reload=True)
    forward_paths: tuple[str, ...] = _setting(
        DEFAULT_FORWARD_PATHS,
        "--forward-path",
        "PREFIX",
        "replace the forwarded list (case-insensitive)",
        parse=_forward_path,
        shown=f"the {len(DEFAULT_FORWARD_PATHS)} Exchange 2007 directories",
        repeatable=True,
    )
    config: Path | None = _setting(
        None,
        "--config",
        "FILE",
        "TOML file with any of these settings (`https_port = 443`, `legacy = [\"a\", \"b\"]`, ...); flags win; re-read on SIGHUP",
        parse=_path,
        commands=_BOTH,
        toml=False,
    )
    log_level: str = _setting("info", "--log-level", "LEVEL", "debug, info or warning", parse=_lower, reload=True, commands=_BOTH)
    workers: int = _setting(1, "--workers", "N", "HTTPS worker processes sharing the one port (`auto`: one per CPU)", parse=lambda flag, value: parse_workers(value))
    # ACME (used when no --cert/--key are given)
    acme_directory: str = _setting(
        "letsencrypt", "--acme-directory", "URL", "`letsencrypt`, `letsencrypt-staging` or any RFC 8555 directory URL", parse=_acme_directory, group="certificates", commands=_BOTH
    )
    acme_email: str | None = _setting(None, "--acme-email", "ADDR", "contact for the ACME account", group="certificates", commands=_BOTH)
    acme_eab_kid: str | None = _setting(None, "--acme-eab-kid", "ID", "External Account Binding key id (ZeroSSL, enterprise CAs)", group="certificates", commands=_BOTH)
    acme_eab_hmac_key: str | None = _setting(None, "--acme-eab-hmac-key", "KEY", "External Account Binding HMAC key, with --acme-eab-kid", group="certificates", commands=_BOTH)
    acme_ca_bundle: Path | None = _setting(
        None, "--acme-ca-bundle", "FILE", "trust for a private ACME server", parse=_ca_file("the ACME server's certificate"), shown="system store", group="certificates", commands=_BOTH
    )
    key_type: str = _setting("ecdsa-p256", "--key-type", "TYPE", "the certificate's key: `ecdsa-p256`, `rsa-2048` or `rsa-3072`", parse=_key_type, group="certificates", commands=_BOTH)
    # Operations and security
    status_bind: str = _setting("127.0.0.1:8404", "--status-bind", "ADDR:PORT", "status page and /metrics listener (`off` disables it)", parse=_status_bind, group="operations")
    allow: tuple[Network | str, ...] = _setting(
        (),
        "--allow",
        "CIDR",
        "accept connections only from these sources (others are closed before TLS); `exchange-online` stands for Microsoft's published Exchange Online ranges (see below)",
        parse=_allow_source,
        shown="any source",
        reload=True,
        repeatable=True,
        group="operations",
    )
    max_connections: int = _setting(1000, "--max-connections", "N", "open client connections (all workers together) before new ones get 503", parse=_count, reload=True, group="operations")
    header_timeout: float = _setting(15.0, "--header-timeout", "S", "seconds a client has to send a request head (then 408)", parse=_seconds, reload=True, group="operations")
    drain_timeout: float = _setting(
        30.0, "--drain-timeout", "S", "on SIGTERM, or when the migration window closes, seconds open requests get to finish", parse=_seconds, reload=True, group="operations"
    )
    ban_threshold: int = _setting(10, "--ban-threshold", "N", "failed logons from one address that trigger a ban", parse=_count, reload=True, group="operations")
    ban_window: float = _setting(600.0, "--ban-window", "S", "seconds in which those failures must occur", parse=_seconds, reload=True, group="operations")
    ban_duration: float = _setting(3600.0, "--ban-duration", "S", "seconds a ban lasts", parse=_seconds, reload=True, group="operations")
    ban_command: str | None = _setting(None, "--ban-command", "CMD", "run `CMD ban IP SECONDS` and `CMD unban IP` on each ban and unban", parse=_command_line, reload=True, group="operations")
    never_ban: tuple[Network, ...] = _setting((), "--never-ban", "CIDR", "addresses never banned", parse=_network, reload=True, repeatable=True, group="operations")
    # The migration window (bridge.ops.window)
    expire_at: dt.datetime | None = _setting(
        None,
        "--expire-at",
        "DATE",
        "stop forwarding at this ISO 8601 date or date-time (a date alone: the end of that day; no zone: UTC)",
        parse=parse_expire_at,
        reload=True,
        group="operations",
    )
    expire_after: float | None = _setting(
        None,
        "--expire-after",
        "DURATION",
        "stop forwarding this long (e.g. `72h`, `14d`) after the bridge first ran with it (kept in the state dir, so restarts do not extend it)",
        parse=parse_duration,
        reload=True,
        group="operations",
    )
    # SNI routing (bridge.net.passthrough)
    passthrough: tuple[PassthroughRoute, ...] = _setting(
        (),
        "--passthrough",
        "NAME=HOST:PORT",
        (
            "TLS for NAME goes to HOST:PORT undecrypted (port 80's requests for it to HOST:80); `*.example.com` covers every name under it, "
            "`*` every other name and none; a `+proxy` suffix sends a PROXY v2 header first"
        ),
        parse=parse_passthrough,
        shown="none (the bridge terminates every name)",
        repeatable=True,
        group="routing",
    )
    terminate: tuple[str, ...] = _setting(
        (),
        "--terminate",
        "NAME",
        "another name the bridge terminates and proxies itself, like --fqdn, when routes exist (`*.example.com` allowed; its certificate must cover it)",
        parse=lambda flag, value: parse_route_name(flag, value),
        repeatable=True,
        group="routing",
    )
    # The migration view and its ledger (bridge.ops.traffic, bridge.ops.migration)
    stall_after: float = _setting(
        600.0,
        "--stall-after",
        "S",
        "seconds an open Outlook Anywhere channel may move no byte before it is flagged stalled (status page, /metrics, one WARNING)",
        parse=_seconds,
        reload=True,
        group="operations",
    )
    ledger_interval: float = _setting(
        60.0,
        "--ledger-interval",
        "S",
        "at most this often the migration ledger (`STATE_DIR/ledger.json`, what `bridge report` reads) is written; and at exit",
        parse=_seconds,
        reload=True,
        group="operations",
    )

    # Mail protocols (bridge.proxy.mail)
    imaps_port: int | None = _setting(
        None,
        "--imaps-port",
        "N",
        "IMAPS listener (implicit TLS, the bridge's certificate, the same gate, bans and --max-connections); the usual port is 993",
        parse=_port,
        shown="off",
        group="mail",
    )
    imap_upstream: LegacyServer | None = _setting(
        None,
        "--imap-upstream",
        "HOST[:PORT]",
        "Exchange 2007's IMAP4 service",
        parse=_upstream,
        shown="the first --legacy host, port 993 (143 with `starttls` or `plain`)",
        group="mail",
    )
    imap_upstream_tls: str = _setting(
        "implicit",
        "--imap-upstream-tls",
        "MODE",
        "`implicit` (TLS from the first byte), `starttls` or `plain` (a trusted network only); TLS 1.0 is allowed and checked with --legacy-fingerprint/--legacy-ca as for HTTPS",
        parse=_mail_tls,
        group="mail",
    )
    pop3s_port: int | None = _setting(None, "--pop3s-port", "N", "POP3S listener (implicit TLS, like --imaps-port); the usual port is 995", parse=_port, shown="off", group="mail")
    pop3_upstream: LegacyServer | None = _setting(
        None,
        "--pop3-upstream",
        "HOST[:PORT]",
        "Exchange 2007's POP3 service",
        parse=_upstream,
        shown="the first --legacy host, port 995 (110 with `starttls` or `plain`)",
        group="mail",
    )
    pop3_upstream_tls: str = _setting("implicit", "--pop3-upstream-tls", "MODE", "`implicit`, `starttls` (STLS) or `plain`, as --imap-upstream-tls", parse=_mail_tls, group="mail")
    smtps_port: int | None = _setting(
        None,
        "--smtps-port",
        "N",
        "SMTP submission listener with implicit TLS (RFC 8314); the usual port is 465",
        parse=_port,
        shown="off",
        group="mail",
    )
    submission_port: int | None = _setting(
        None,
        "--submission-port",
        "N",
        "SMTP submission listener with STARTTLS, which the bridge answers itself (AUTH only after it); the usual port is 587",
        parse=_port,
        shown="off",
        group="mail",
    )
    smtp_upstream: LegacyServer | None = _setting(
        None,
        "--smtp-upstream",
        "HOST[:PORT]",
        "Exchange 2007's client receive connector, for both submission listeners",
        parse=_upstream,
        shown="the first --legacy host, port 587 (465 with `implicit`)",
        group="mail",
    )
    smtp_upstream_tls: str = _setting(
        "starttls",
        "--smtp-upstream-tls",
        "MODE",
        "`starttls` (the bridge's own EHLO and STARTTLS first; Exchange 2007 has no implicit-TLS SMTP), `implicit` or `plain`, as --imap-upstream-tls",
        parse=_mail_tls,
        group="mail",
    )
    mail_fqdn: str | None = _setting(
        None,
        "--mail-fqdn",
        "NAME",
        "a second name in the ACME certificate for mail clients (e.g. `imap.example.com`); its A record must point here too",
        parse=lambda flag, value: validate_fqdn(str(value)),
        group="mail",
        commands=_BOTH,
    )

    def mail_server(self, protocol: str) -> LegacyServer:
        """Where ``protocol``'s sessions go (imap, pop3, smtp): its --*-upstream, else the first --legacy
        host; the port by its --*-upstream-tls when none is given."""
        upstream, mode = getattr(self, f"{protocol}_upstream"), getattr(self, f"{protocol}_upstream_tls")
        host = upstream.host if upstream is not None else (self.legacy[0].host if self.legacy else "")
        implicit_port, other_port = MAIL_UPSTREAM_PORTS[protocol]
        port = upstream.port if upstream is not None and upstream.port else (implicit_port if mode == "implicit" else other_port)
        return LegacyServer(host, port)

    @property
    def imap_server(self) -> LegacyServer:
        return self.mail_server("imap")

    @property
    def mail_ports(self) -> dict[str, int]:
        """The configured mail listeners: flag -> port."""
        flags = {"--imaps-port": self.imaps_port, "--pop3s-port": self.pop3s_port, "--smtps-port": self.smtps_port, "--submission-port": self.submission_port}
        return {flag: port for flag, port in flags.items() if port is not None}

    @property
    def certificate_names(self) -> list[str]:
        """The names the ACME certificate covers: --fqdn, then --mail-fqdn."""
        return [self.fqdn] + ([self.mail_fqdn] if self.mail_fqdn and self.mail_fqdn != self.fqdn else [])

    @property
    def legacy_hostnames(self) -> set[str]:
        return {server.host.lower() for server in self.legacy}


def _shown(value: Any) -> str:
    if value is None or value == () or value == []:
        return "none"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return f"`{value}`"


def _settings() -> tuple[Setting, ...]:
    rows = []
    for item in fields(BridgeConfig):
        row = dict(item.metadata["setting"])
        default = item.default_factory() if item.default is MISSING else item.default  # type: ignore[operator]  # a field without a default has a default_factory
        row["shown_default"] = row["shown_default"] or _shown(default)
        rows.append(Setting(name=item.name, default=default, **row))
    return tuple(rows)


SETTINGS: tuple[Setting, ...] = _settings()
BY_NAME = {setting.name: setting for setting in SETTINGS}
TOML_KEYS = tuple(setting.name for setting in SETTINGS if setting.toml)
# SIGHUP applies these to a running bridge; the rest need a restart.
RELOADED_SETTINGS = tuple(setting.name for setting in SETTINGS if setting.reload)
RESTART_SETTINGS = tuple(setting.name for setting in SETTINGS if not setting.reload)


def apply_reload(current: BridgeConfig, new: BridgeConfig) -> list[str]:
    """SIGHUP: copy the settings a running bridge applies from ``new`` onto ``current``; returns the
    names of the changed settings that need a restart (they keep their running values)."""
    changed = [name for name in RESTART_SETTINGS if getattr(current, name) != getattr(new, name)]
    for name in RELOADED_SETTINGS:
        setattr(current, name, getattr(new, name))
    return changed


# --------------------------------------------------------------------------- flags, file, validation


def add_setting_arguments(parser: argparse.ArgumentParser, command: str = "up") -> None:
    """The flags of ``command`` ("up" or "cert"), grouped, each help line naming its real default."""
    groups: dict[str, Any] = {}
    for setting in SETTINGS:
        if command not in setting.commands:
            continue
        if setting.group not in groups:
            title = GROUPS[setting.group]
            groups[setting.group] = parser if title is None else parser.add_argument_group(title)
        groups[setting.group].add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.metavar,
            help=setting.help_line(),
            action="append" if setting.repeatable else "store",
        )


def config_from_args(args: argparse.Namespace, command: str = "up", **required: bool) -> BridgeConfig:
    """The configuration from parsed flags over the --config file; ``required`` as for build_config."""
    flags = {setting.name: getattr(args, setting.name, None) for setting in SETTINGS if command in setting.commands}
    path = flags.get("config")
    file_values = load_toml(Path(path)) if path else {}
    return build_config(merge(file_values, flags), **required)


def load_settings(path: Path | None) -> BridgeConfig:
    """The bridge's settings from its TOML file alone (or the defaults), for commands beside it (status, ban)."""
    return build_config(load_toml(path) if path else {}, require_fqdn=False, require_legacy=False)


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
    unknown = sorted(set(data) - set(TOML_KEYS))
    if unknown:
        named = " and ".join(f"{key}{_nearest(key)}" for key in unknown)
        what = "settings" if len(unknown) > 1 else "setting"
        raise ConfigError(f"Config file {path} has the unknown {what} {named}; correct or remove {'them' if len(unknown) > 1 else 'it'} (the README lists the settings).")
    return data


def _nearest(key: str) -> str:
    candidates = difflib.get_close_matches(key.replace("-", "_").lower(), TOML_KEYS, n=1, cutoff=0.0)
    return f" (did you mean {candidates[0]}?)" if candidates else ""


def build_config(values: dict[str, Any], *, require_fqdn: bool = True, require_legacy: bool = True) -> BridgeConfig:
    """Validate merged settings (TOML overlaid by flags) into a BridgeConfig."""
    if require_fqdn and not values.get("fqdn"):
        validate_fqdn("")  # the "No FQDN given" sentence
    config = BridgeConfig()
    for setting in SETTINGS:
        value = values.get(setting.name)
        if value is None or value == "":
            continue
        if setting.repeatable:
            items = [setting.parse(setting.flag, item) for item in _as_list(value)]
            if items:
                setattr(config, setting.name, items if isinstance(setting.default, list) else tuple(items))
        else:
            setattr(config, setting.name, setting.parse(setting.flag, value))
    if require_legacy and not config.legacy:
        raise ConfigError("No legacy server given: pass --legacy with the Exchange 2007 host, e.g. --legacy owa.customer.example.")
    if bool(config.cert) != bool(config.key):
        raise ConfigError("--cert and --key go together; give both (the certificate chain and its private key) or neither.")
    if config.expire_at is not None and config.expire_after is not None:
        raise ConfigError("--expire-at and --expire-after both set the end of the migration window; give one of them.")
    if bool(config.acme_eab_kid) != bool(config.acme_eab_hmac_key):
        raise ConfigError("--acme-eab-kid and --acme-eab-hmac-key go together; give both as your CA shows them, or neither.")
    check_routes(config)
    return config


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def merge(file_values: dict[str, Any], flag_values: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line win over the file; unset flags (None/empty) do not."""
    merged = dict(file_values)
    for key, value in flag_values.items():
        if value is None or value == [] or value == ():
            continue
        merged[key] = value
    return merged


# --------------------------------------------------------------------------- the README's tables


def options_table(group: str) -> str:
    """The README's Markdown table of one group's settings (option, default, meaning), and which of them SIGHUP applies."""
    rows = [setting for setting in SETTINGS if setting.group == group]
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    for setting in rows:
        repeatable = "; repeatable" if setting.repeatable else ""
        lines.append(f"| `{setting.flag} {setting.metavar}` | {setting.shown_default} | {setting.help}{repeatable} |")
    reloaded = [f"`{setting.flag}`" for setting in rows if setting.reload]
    if not reloaded:
        note = "Changing any of these needs a restart."
    elif len(reloaded) == len(rows):
        note = "`SIGHUP` applies all of these to the running bridge."
    else:
        note = f"`SIGHUP` applies {', '.join(reloaded[:-1])} and {reloaded[-1]} to the running bridge; the others need a restart."
    return "\n".join(lines) + "\n\n" + note + "\n"


_README_TABLE = re.compile(r"(<!-- options: (\w+) \(generated by bridge\.config\.options_table\) -->\n).*?(?=<!-- /options -->)", re.DOTALL)


def render_readme(text: str) -> str:
    """``text`` (the README) with every generated options table replaced by what options_table renders now."""
    return _README_TABLE.sub(lambda match: match.group(1) + options_table(match.group(2)), text)


if __name__ == "__main__":  # python -m bridge.config README.md: regenerate the README's options tables
    import sys

    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(render_readme(readme.read_text()))
