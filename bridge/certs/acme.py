"""Certificates over ACME (RFC 8555): HTTP-01 on the bridge's own port 80, certbot-style storage.

Storage under the state dir (certbot's layout, so tools that know certbot find the files):

    live/<fqdn>/{fullchain,privkey,cert,chain}.pem   live/<fqdn> is a symlink to archive/<fqdn>/<NNNN>/,
    archive/<fqdn>/<NNNN>/... + lineage.json        swapped atomically: key and chain always match
    accounts/<ca host>/<directory path>/{private_key.json,regr.json}

The ``acme`` library is blocking (requests); every network step runs in a worker thread while the event
loop keeps serving the challenge answers from the ``challenges`` dict (token -> key authorization).
Every failure a user can cause becomes an ``AcmeError`` whose message is one sentence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import logging
import os
import shutil
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import josepy as jose
import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from bridge import __version__
from bridge.certs.keys import atomic_write, cert_pem, inspect_certificate, key_pem, new_private_key
from bridge.config import BridgeConfig
from bridge.errors import AcmeError

log = logging.getLogger("bridge.acme")

DIRECTORIES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
BAD_NONCE_ATTEMPTS = 10  # the library retries badNonce once; CAs (and Pebble, on purpose) reject more
NETWORK_TIMEOUT = 30
ORDER_SECONDS = 120  # validation plus finalization
ARCHIVE_VERSIONS_KEPT = 5
USER_AGENT = f"exchange-bridge/{__version__}"

T = TypeVar("T")


def directory_url(config: BridgeConfig) -> str:
    name = config.acme_directory.strip()
    if name.lower() in DIRECTORIES:
        return DIRECTORIES[name.lower()]
    if name.startswith(("https://", "http://")):
        return name
    raise AcmeError(f"--acme-directory {name!r} is neither letsencrypt, letsencrypt-staging nor an https:// directory URL; give one of those.")


# ---------------------------------------------------------------------------------------------- storage


@dataclass
class StoredCertificate:
    chain: list[x509.Certificate]  # leaf first
    meta: dict[str, Any]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


class Lineage:
    """live/<fqdn>/ and its archive: one certificate lineage, written so a crash never splits key and chain."""

    def __init__(self, state_dir: Path, fqdn: str) -> None:
        self.state_dir = state_dir
        self.fqdn = fqdn
        self.live = state_dir / "live" / fqdn
        self.archive = state_dir / "archive" / fqdn

    fullchain = property(lambda self: self.live / "fullchain.pem")
    privkey = property(lambda self: self.live / "privkey.pem")
    cert = property(lambda self: self.live / "cert.pem")
    chain = property(lambda self: self.live / "chain.pem")

    def load(self) -> StoredCertificate | None:
        """The stored certificate, or None when there is none; raises AcmeError when it is unreadable."""
        if not self.fullchain.exists() or not self.privkey.exists():
            return None
        try:
            chain = x509.load_pem_x509_certificates(self.fullchain.read_bytes())
        except (ValueError, OSError) as exc:
            raise AcmeError(f"The stored certificate {self.fullchain} cannot be read ({exc}); delete {self.live} so a new one is ordered.") from None
        meta_file = self.live / "lineage.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return StoredCertificate(chain, meta)

    def save(self, fullchain_pem: str, private_key_pem: bytes, meta: dict[str, Any]) -> None:
        chain = x509.load_pem_x509_certificates(fullchain_pem.encode())
        version = self._next_version()
        atomic_write(version / "privkey.pem", private_key_pem, mode=0o600)
        atomic_write(version / "cert.pem", cert_pem(chain[0]))
        atomic_write(version / "chain.pem", b"".join(cert_pem(c) for c in chain[1:]))
        atomic_write(version / "fullchain.pem", b"".join(cert_pem(c) for c in chain))
        atomic_write(version / "lineage.json", json.dumps(meta, indent=2).encode())
        self._point_live_at(version)
        self._prune()

    def _next_version(self) -> Path:
        _private_dir(self.archive)
        numbers = [int(p.name) for p in self.archive.iterdir() if p.name.isdigit()]
        version = self.archive / f"{max(numbers, default=0) + 1:04d}"
        _private_dir(version)
        return version

    def _point_live_at(self, version: Path) -> None:
        _private_dir(self.live.parent)
        if self.live.is_dir() and not self.live.is_symlink():  # a plain directory from elsewhere: keep it aside
            self.live.rename(self.archive / f"previous-{dt.datetime.now():%Y%m%d%H%M%S}")
        target = os.path.relpath(version, self.live.parent)
        temporary = self.live.parent / f".{self.fqdn}.new"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, self.live)  # atomic: readers see the old set or the new set, never a mix

    def _prune(self) -> None:
        versions = sorted(p for p in self.archive.iterdir() if p.name.isdigit())
        for old in versions[:-ARCHIVE_VERSIONS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


class AccountStore:
    """accounts/<ca host>/<directory path>/: the account key (JWK, 0600) and its registration."""

    def __init__(self, state_dir: Path, url: str) -> None:
        parts = urlsplit(url)
        self.dir = state_dir / "accounts" / parts.netloc / (parts.path.strip("/") or "directory")
        self.key_file = self.dir / "private_key.json"
        self.regr_file = self.dir / "regr.json"

    def key(self) -> jose.JWK:
        """The stored account key, or a new P-256 key stored now (before any registration uses it)."""
        if self.key_file.exists():
            return jose.JWK.from_json(json.loads(self.key_file.read_text()))  # type: ignore[return-value]  # josepy types from_json by its base class
        key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        _private_dir(self.dir)
        atomic_write(self.key_file, key.json_dumps().encode(), mode=0o600)
        return key

    def registration(self) -> messages.RegistrationResource | None:
        if not self.regr_file.exists():
            return None
        return messages.RegistrationResource.from_json(json.loads(self.regr_file.read_text()))

    def save_registration(self, regr: messages.RegistrationResource) -> None:
        body = regr.body.update(external_account_binding=None)  # some CAs echo the binding back; it is not needed again
        atomic_write(self.regr_file, regr.update(body=body).json_dumps(indent=2).encode(), mode=0o600)

    def forget_registration(self) -> None:
        self.regr_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- client


class PatientNetwork(acme_client.ClientNetwork):
    """ClientNetwork that retries ``badNonce`` several times and remembers the last Retry-After header."""

    last_retry_after: str | None = None

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(1, BAD_NONCE_ATTEMPTS + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error_code(error) != "badNonce" or attempt == BAD_NONCE_ATTEMPTS:
                    raise
                log.debug("ACME server rejected the nonce (attempt %d), retrying with a fresh one", attempt)
        raise AssertionError("unreachable")

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_retry_after = response.headers.get("Retry-After")
        return response


class _NewOrderReplacing(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces``: links the renewal to the certificate it replaces."""

    replaces: str | None = jose.field("replaces", omitempty=True)


def error_code(error: messages.Error) -> str:
    return str(error.typ or "").rsplit(":", 1)[-1]


def ari_certificate_id(cert: x509.Certificate) -> str:
    """RFC 9773 CertID: base64url(authority key identifier) "." base64url(DER serial)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""
    serial = cert.serial_number
    serial_der = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)
    encode = lambda data: base64.urlsafe_b64encode(data).decode().rstrip("=")  # noqa: E731
    return f"{encode(aki)}.{encode(serial_der)}"


@dataclass
class PendingOrder:
    order: messages.OrderResource
    answers: list[tuple[messages.ChallengeBody, acme_challenges.ChallengeResponse, str]]  # challenge, response, key authorization
    private_key_pem: bytes


@dataclass
class RenewalWindow:
    start: dt.datetime
    end: dt.datetime
    retry_after: float  # seconds until the CA wants to be asked again
    explanation: str | None = None


class AcmeSession:
    """One conversation with the CA; blocking: call its methods from a worker thread."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.url = directory_url(config)
        self.accounts = AccountStore(config.state_dir, self.url)
        verify: Any = str(config.acme_ca_bundle) if config.acme_ca_bundle else True
        self.net = PatientNetwork(None, alg=jose.ES256, verify_ssl=verify, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
        with self.translated("directory"):
            self.client = acme_client.ClientV2(acme_client.ClientV2.get_directory(self.url, self.net), net=self.net)
        self.net.key = self.accounts.key()  # created (and stored) only once the CA answered

    @property
    def offers_renewal_info(self) -> bool:
        return "renewalInfo" in self.client.directory.to_partial_json()

    # -- account

    def ensure_account(self) -> messages.RegistrationResource:
        regr = self.accounts.registration()
        if regr is not None:
            self.net.account = regr
            log.info("using the stored ACME account %s", regr.uri)
            return regr
        return self.register()

    def register(self) -> messages.RegistrationResource:
        config = self.config
        if self.client.external_account_required() and not config.acme_eab_kid:
            raise AcmeError(f"The CA at {self.url} requires External Account Binding; pass --acme-eab-kid and --acme-eab-hmac-key as shown in your account at the CA.")
        binding = None
        if config.acme_eab_kid and config.acme_eab_hmac_key:
            try:
                binding = messages.ExternalAccountBinding.from_data(
                    self.net.key.public_key(),  # type: ignore[union-attr]  # the key is set in __init__
                    config.acme_eab_kid,
                    config.acme_eab_hmac_key,
                    self.client.directory,
                )
            except (binascii.Error, ValueError):
                raise AcmeError("--acme-eab-hmac-key is not base64url text; copy the HMAC key exactly as the CA shows it.") from None
        registration = messages.NewRegistration.from_data(email=config.acme_email, terms_of_service_agreed=True, external_account_binding=binding)
        with self.translated("account"):
            try:
                regr = self.client.new_account(registration)
            except errors.ConflictError as conflict:  # this key already has an account: use it
                regr = messages.RegistrationResource(uri=conflict.location, body=messages.Registration())
                self.net.account = regr
        self.accounts.save_registration(regr)
        log.info("registered ACME account %s at %s (stored in %s)", regr.uri, self.url, self.accounts.dir)
        return regr

    # -- order

    def new_order(self, names: list[str], key_type: str, replaces: str | None = None) -> PendingOrder:
        """An order for ``names`` (--fqdn, and --mail-fqdn when given), each validated over HTTP-01."""
        private_key_pem = key_pem(new_private_key(key_type))
        csr_pem = crypto_util.make_csr(private_key_pem, names)
        with self.translated("order"):
            try:
                order = self._order(csr_pem, replaces)
            except messages.Error as error:
                if error_code(error) != "accountDoesNotExist":
                    raise
                log.warning("the CA no longer knows the stored ACME account; registering a new one")
                self.accounts.forget_registration()
                self.net.account = None
                self.register()
                order = self._order(csr_pem, replaces)
        answers = []
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA still holds a recent validation for this name
            http01 = [c for c in authz.body.challenges if isinstance(c.chall, acme_challenges.HTTP01)]
            if not http01:
                raise AcmeError(f"The CA offers no HTTP-01 challenge for {authz.body.identifier.value}; use a CA that validates over HTTP-01 (port 80).")
            response, validation = http01[0].response_and_validation(self.net.key)
            answers.append((http01[0], response, validation))
        return PendingOrder(order, answers, private_key_pem)

    def _order(self, csr_pem: bytes, replaces: str | None) -> messages.OrderResource:
        if replaces is None:
            return self.client.new_order(csr_pem)
        try:
            return self._order_replacing(csr_pem, replaces)
        except (errors.ConflictError, messages.Error) as error:
            if isinstance(error, messages.Error) and error_code(error) not in ("alreadyReplaced", "malformed", "conflict"):
                raise
            log.info("the CA declined the 'replaces' link (%s); ordering without it", error)
            return self.client.new_order(csr_pem)

    def _order_replacing(self, csr_pem: bytes, replaces: str) -> messages.OrderResource:
        """ClientV2.new_order plus ``replaces``: acme (5.9) has no public way to send it, so this posts the
        order itself, with the public ClientNetwork.post and message classes only."""
        csr = x509.load_pem_x509_csr(csr_pem)
        names = [str(n) for n in csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)]
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name) for name in names]
        new_nonce_url = self.client.directory["newNonce"]
        response = self.net.post(self.client.directory["newOrder"], _NewOrderReplacing(identifiers=identifiers, replaces=replaces), new_nonce_url=new_nonce_url)
        body = messages.Order.from_json(response.json())
        authorizations = []
        for url in body.authorizations:
            answer = self.net.post(url, None, new_nonce_url=new_nonce_url)  # POST-as-GET
            authorizations.append(messages.AuthorizationResource(body=messages.Authorization.from_json(answer.json()), uri=answer.headers.get("Location", url)))
        return messages.OrderResource(body=body, uri=response.headers.get("Location"), authorizations=authorizations, csr_pem=csr_pem)

    def finish(self, pending: PendingOrder) -> str:
        """Tell the CA the answers are up, wait for validation and issuance; returns the full chain PEM."""
        with self.translated("validation"):
            for challenge, response, _ in pending.answers:
                self.client.answer_challenge(challenge, response)
            deadline = dt.datetime.now() + dt.timedelta(seconds=ORDER_SECONDS)
            order = self.client.poll_and_finalize(pending.order, deadline=deadline)
        return order.fullchain_pem

    # -- renewal information (RFC 9773)

    def renewal_window(self, cert: x509.Certificate) -> RenewalWindow | None:
        """The CA's suggested renewal window, or None when the directory offers no renewalInfo."""
        if not self.offers_renewal_info:
            return None
        url = f"{self.client.directory['renewalInfo'].rstrip('/')}/{ari_certificate_id(cert)}"
        with self.translated("renewal information"):
            response = self.net.get(url, content_type="application/json")
        try:
            body = response.json()
            start = dt.datetime.fromisoformat(body["suggestedWindow"]["start"])
            end = dt.datetime.fromisoformat(body["suggestedWindow"]["end"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AcmeError(f"The CA's renewal information at {url} is not understood ({exc}); the bridge renews by lifetime instead.") from None
        try:
            retry_after = float(int(response.headers.get("Retry-After", "21600")))
        except ValueError:
            retry_after = 21600.0
        return RenewalWindow(start, end, min(max(retry_after, 60.0), 86400.0), body.get("explanationURL"))

    # -- errors

    def translated(self, stage: str) -> _Translate:
        return _Translate(self, stage)


class _Translate:
    """Context manager turning acme/requests exceptions into one-sentence AcmeErrors."""

    def __init__(self, session: AcmeSession, stage: str) -> None:
        self.session = session
        self.stage = stage

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None or isinstance(exc, AcmeError) or not isinstance(exc, Exception):
            return False
        fqdn = self.session.config.fqdn
        raise explain(exc, stage=self.stage, fqdn=fqdn, url=self.session.url, retry_after=self.session.net.last_retry_after) from exc


def explain(exc: Exception, *, stage: str, fqdn: str, url: str, retry_after: str | None = None) -> AcmeError:
    """One sentence for a failed ACME step, naming what the CA said and what to do."""
    if isinstance(exc, errors.ValidationError):
        problems = [c.error for authz in exc.failed_authzrs for c in authz.body.challenges if c.error is not None]
        return _validation_problem(problems[0], fqdn) if problems else AcmeError(f"The CA could not validate {fqdn}; check that port 80 reaches this machine.")
    if isinstance(exc, errors.IssuanceError):
        return _problem(exc.error, stage="certificate issuance", fqdn=fqdn, url=url, retry_after=retry_after)
    if isinstance(exc, errors.TimeoutError):
        return AcmeError(f"The CA did not finish validating {fqdn} within {ORDER_SECONDS} s; check that http://{fqdn}/ reaches this machine on port 80 from the internet, then retry.")
    if isinstance(exc, messages.Error):
        return _problem(exc, stage=stage, fqdn=fqdn, url=url, retry_after=retry_after)
    if isinstance(exc, requests.exceptions.SSLError):
        return AcmeError(f"The ACME server {url} presented a certificate this machine does not trust ({_network_reason(exc)}); for a private CA pass its root with --acme-ca-bundle.")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return AcmeError(f"The ACME directory {url} is unreachable ({_network_reason(exc)}); check the URL, DNS and outbound HTTPS (firewall or proxy) from this machine.")
    if isinstance(exc, (errors.ClientError, ValueError, jose.DeserializationError)) and stage == "directory":
        return AcmeError(f"{url} did not answer with an ACME directory ({_short(exc)}); check --acme-directory.")
    return AcmeError(f"The ACME {stage} step failed ({type(exc).__name__}: {_short(exc)}); rerun with --log-level debug to see the exchange with the CA.")


def _validation_problem(problem: messages.Error, fqdn: str) -> AcmeError:
    code, said = error_code(problem), problem.detail or problem.description or str(problem.typ)
    if code in ("dns", "unknownHost", "dnssec"):
        return AcmeError(f"{fqdn} does not resolve to this machine for the CA (the CA said: {said}); create a DNS A record for {fqdn} pointing at this machine's public address, then retry.")
    if code == "caa":
        return _caa(fqdn, said)
    if code in ("connection", "tls"):
        return AcmeError(
            f"The CA could not reach http://{fqdn}/ on port 80 (the CA said: {said}); open port 80 to the internet (firewall, NAT, cloud security group) and check that {fqdn} points at this machine."
        )
    return AcmeError(f"The CA reached http://{fqdn}/ but did not get this bridge's HTTP-01 answer (the CA said: {said}); point {fqdn} at this machine and let port 80 reach the bridge directly.")


def _problem(problem: messages.Error, *, stage: str, fqdn: str, url: str, retry_after: str | None) -> AcmeError:
    code, said = error_code(problem), problem.detail or problem.description or str(problem.typ)
    if code == "rateLimited":
        return AcmeError(f"The CA rate-limited this {stage} (the CA said: {said}); retry after {_when(retry_after)}, and test with --acme-directory letsencrypt-staging.")
    if code == "caa":
        return _caa(fqdn, said)
    if code in ("dns", "connection", "tls", "incorrectResponse", "unknownHost") or (code == "unauthorized" and stage == "validation"):
        return _validation_problem(problem, fqdn)
    if code == "externalAccountRequired":
        return AcmeError(f"The CA at {url} requires External Account Binding (the CA said: {said}); pass --acme-eab-kid and --acme-eab-hmac-key from your CA account.")
    if stage == "account" or code in ("unauthorized", "accountDoesNotExist", "invalidContact", "unsupportedContact"):
        return AcmeError(f"The CA refused the ACME account (the CA said: {said}); check --acme-email and, if the CA uses them, --acme-eab-kid and --acme-eab-hmac-key.")
    if code in ("rejectedIdentifier", "unsupportedIdentifier"):
        return AcmeError(f"The CA will not issue a certificate for {fqdn} (the CA said: {said}); use a name the CA accepts.")
    return AcmeError(f"The CA refused the {stage} for {fqdn} (the CA said: {said}); fix what it names, or rerun with --log-level debug.")


def _caa(fqdn: str, said: str) -> AcmeError:
    return AcmeError(f"A DNS CAA record forbids this CA to issue for {fqdn} (the CA said: {said}); add a CAA 'issue' record for the CA (e.g. 0 issue \"letsencrypt.org\") or remove the restriction.")


def _when(retry_after: str | None) -> str:
    if not retry_after:
        return "the time the CA names (see its rate-limit page)"
    try:
        moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=int(retry_after))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            moment = parsedate_to_datetime(retry_after)
        except (TypeError, ValueError):
            return retry_after
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _network_reason(exc: BaseException) -> str:
    """The innermost useful reason inside requests' and urllib3's wrappers (verify message, errno text)."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current.reason)
        if isinstance(current, ssl.SSLError):
            return str(current.reason or current)
        if isinstance(current, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(current, OSError) and current.strerror and not isinstance(current, requests.exceptions.RequestException):
            return current.strerror.lower()
        if isinstance(current, (socket.timeout, TimeoutError)):
            return "timed out"
        inner = [getattr(current, "reason", None), current.__cause__, current.__context__, *getattr(current, "args", ())]
        stack.extend(item for item in inner if isinstance(item, BaseException))
    return _short(exc)


def _short(exc: BaseException) -> str:
    if exc.args and isinstance(exc.args[0], requests.Response):
        return f"HTTP {exc.args[0].status_code}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------- obtain


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(function, *args)


async def open_session(config: BridgeConfig) -> AcmeSession:
    return await _in_thread(AcmeSession, config)


async def obtain(config: BridgeConfig, challenges: dict[str, str], *, reason: str, replaces: x509.Certificate | None = None) -> StoredCertificate:
    """Order a certificate for config.fqdn, answering HTTP-01 through ``challenges``; store it; return it."""
    session = await open_session(config)
    log.info("ordering a certificate for %s from %s (%s)", config.fqdn, session.url, reason)
    await _in_thread(session.ensure_account)
    replaces_id = ari_certificate_id(replaces) if replaces is not None and session.offers_renewal_info else None
    pending = await _in_thread(session.new_order, config.certificate_names, config.key_type, replaces_id)
    for challenge, _, validation in pending.answers:
        challenges[challenge.chall.encode("token")] = validation
    if pending.answers:
        log.info("answering the HTTP-01 challenge for %s on port %d", config.fqdn, config.http_port)
    try:
        fullchain_pem = await _in_thread(session.finish, pending)
    finally:
        for challenge, _, _ in pending.answers:
            challenges.pop(challenge.chall.encode("token"), None)
    meta = {
        "directory": session.url,
        "account": session.net.account.uri if session.net.account else None,
        "order": pending.order.uri,
        "key_type": config.key_type,
        "issued": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "replaces": replaces_id,
    }
    lineage = Lineage(config.state_dir, config.fqdn)
    await _in_thread(lineage.save, fullchain_pem, pending.private_key_pem, meta)
    stored = lineage.load()
    assert stored is not None
    info = inspect_certificate(stored.leaf)
    log.info("certificate for %s issued by %s: serial %s, valid until %s (stored in %s)", config.fqdn, info.issuer, info.serial, f"{info.not_after:%Y-%m-%d}", lineage.live)
    return stored


def reuse_refusal(stored: StoredCertificate | None, config: BridgeConfig, url: str, now: dt.datetime | None = None) -> str | None:
    """Why the stored certificate cannot be served as it is (None: it can)."""
    if stored is None:
        return "no certificate stored yet"
    now = now or dt.datetime.now(dt.UTC)
    info = inspect_certificate(stored.leaf)
    if info.not_after <= now:
        return f"the stored certificate expired on {info.not_after:%Y-%m-%d}"
    covered = [name.lower() for name in info.sans]
    for name in config.certificate_names:
        if name not in covered:
            return f"the stored certificate covers {', '.join(info.sans)}, not {name}"
    if stored.meta.get("directory") not in (None, url):
        return f"the stored certificate came from {stored.meta['directory']}, not {url}"
    if stored.meta.get("key_type") not in (None, config.key_type):
        return f"the stored certificate has a {stored.meta['key_type']} key and --key-type is {config.key_type}"
    return None


async def certificate_for_bridge(config: BridgeConfig, challenges: dict[str, str]) -> tuple[Path, Path]:
    """The bridge's certificate: the stored one when still usable (no CA contact), else a new order."""
    lineage = Lineage(config.state_dir, config.fqdn)
    stored = lineage.load()
    refusal = reuse_refusal(stored, config, directory_url(config))
    if refusal is None:
        assert stored is not None
        info = inspect_certificate(stored.leaf)
        log.info("reusing the stored certificate for %s (serial %s, valid until %s, %d days left): no new order", config.fqdn, info.serial, f"{info.not_after:%Y-%m-%d}", info.days_left)
    else:
        await obtain(config, challenges, reason=refusal)
    return lineage.fullchain, lineage.privkey
