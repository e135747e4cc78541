"""Certificates: locally generated ones (lab, demo, tests), inspection, and atomic key storage."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.config import is_ip_address

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_private_key(key_type: str = "ecdsa-p256") -> PrivateKey:
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    bits = {"rsa-1024": 1024, "rsa-2048": 2048, "rsa-3072": 3072}[key_type]
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _name(common_name: str, organisation: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(attributes)


def self_signed(
    names: list[str],
    key: PrivateKey,
    *,
    days: int = 365,
    not_before: dt.datetime | None = None,
    hash_algorithm: hashes.HashAlgorithm | None = None,
    organisation: str | None = None,
) -> x509.Certificate:
    """A self-signed server certificate, like the one Exchange 2007 setup makes."""
    subject = _name(names[0], organisation)
    builder = _server_certificate(names, subject, subject, key, days, not_before)
    return builder.sign(key, hash_algorithm or hashes.SHA256())  # type: ignore[arg-type]  # cryptography's stubs list only its SHA-2/SHA-3 classes


def _server_certificate(names: list[str], subject: x509.Name, issuer: x509.Name, key: PrivateKey, days: int, not_before: dt.datetime | None) -> x509.CertificateBuilder:
    """A TLS server certificate for names, valid for days from not_before (default: 5 minutes ago)."""
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )


@dataclass
class LocalCA:
    """A throwaway CA for the demo and the tests: a client that trusts it trusts the bridge."""

    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "exchange-bridge local test CA") -> LocalCA:
        key = new_private_key("ecdsa-p256")
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, names: list[str], key: PrivateKey, *, days: int = 90, not_before: dt.datetime | None = None) -> x509.Certificate:
        return _server_certificate(names, _name(names[0]), self.cert.subject, key, days, not_before).sign(self.key, hashes.SHA256())


def write_pair(directory: Path, cert: x509.Certificate, key: PrivateKey, *, chain: Sequence[x509.Certificate] = ()) -> tuple[Path, Path]:
    """Write fullchain.pem (leaf + chain) and privkey.pem (0600) into directory."""
    fullchain = directory / "fullchain.pem"
    privkey = directory / "privkey.pem"
    atomic_write(privkey, key_pem(key), mode=0o600)
    atomic_write(fullchain, cert_pem(cert) + b"".join(cert_pem(c) for c in chain))
    return fullchain, privkey


@dataclass
class CertificateInfo:
    subject: str
    sans: list[str]
    issuer: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    signature_algorithm: str
    sha256: str

    @property
    def days_left(self) -> float:
        return (self.not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def describe_key(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ECDSA {public_key.curve.name}"
    return type(public_key).__name__


def inspect_certificate(cert: x509.Certificate) -> CertificateInfo:
    try:
        sans = [str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)]
        sans += [str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    try:
        signature = cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else "none"
    except Exception:  # unsupported algorithm in an odd legacy certificate
        signature = cert.signature_algorithm_oid.dotted_string
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        sans=sans,
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_type=describe_key(cert.public_key()),
        signature_algorithm=signature,
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def load_pem_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def legacy_self_signed(directory: Path, names: list[str], *, days: int = 365, expired: bool = False, key_bits: int = 1024) -> tuple[Path, Path]:
    """An Exchange-2007-style certificate: self-signed, RSA 1024 (or ``key_bits``), SHA-1 (cert.pem, key.pem).

    cryptography no longer signs with SHA-1, so this asks the openssl command, which still does.
    """
    import shutil
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "legacy-cert.pem", directory / "legacy-key.pem"
    san = ",".join(("IP:" if is_ip_address(n) else "DNS:") + n for n in names)
    if shutil.which("openssl") is None:
        raise RuntimeError("The openssl command is missing; install it (apt-get install openssl) to create the lab's SHA-1 certificate.")
    if expired:
        # OpenSSL 3.0's req cannot back-date; an expired certificate need not be SHA-1 as well.
        private = new_private_key("rsa-2048")
        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
        atomic_write(key, key_pem(private), mode=0o600)
        atomic_write(cert, cert_pem(self_signed(names, private, days=399, not_before=start)))
        return cert, key
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        f"rsa:{key_bits}",
        "-sha1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-subj",
        f"/CN={names[0]}",
        "-addext",
        f"subjectAltName={san}",
        "-days",
        str(days),
    ]
    subprocess.run(command, check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key
