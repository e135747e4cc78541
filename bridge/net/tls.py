"""TLS contexts: a modern front end (TLS 1.2/1.3) and a client that still speaks to 2007-era servers."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from bridge.errors import CertificateError

# Forward-secret AEAD suites only: no CBC, no RSA key exchange. TLS 1.3 suites are fixed by OpenSSL.
FRONT_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"

# What a Windows 2003/2008 Exchange 2007 CAS offers, and what OpenSSL 3 refuses at level 1 and up:
# RSA key exchange with CBC-SHA1, SHA-1 signatures, 1024-bit keys.
LEGACY_CIPHERS = "DEFAULT:AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:@SECLEVEL=0"


def front_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Server context for the public listener; load_front_certificate() can swap the pair later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(FRONT_CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    context.set_ecdh_curve("prime256v1")
    load_front_certificate(context, cert, key)
    return context


def load_front_certificate(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load (or hot-swap) the certificate: new handshakes get it, open connections keep theirs."""
    for path, what in ((cert, "certificate"), (key, "private key")):
        if not path.exists():
            raise CertificateError(f"The {what} file {path} does not exist; check the path given with --{'cert' if what == 'certificate' else 'key'}.")
        try:
            path.open("rb").close()
        except PermissionError:
            raise CertificateError(f"The {what} file {path} is not readable by this user; run the bridge as a user that can read it or fix its permissions.") from None
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if "KEY_VALUES_MISMATCH" in reason or "X509_CHECK_PRIVATE_KEY" in reason:
            raise CertificateError(f"The private key {key} does not belong to the certificate {cert}; give the key that was generated with that certificate.") from None
        if "PEM" in reason or "NO_START_LINE" in reason or "BAD_BASE64" in reason or "ASN1" in reason:
            raise CertificateError(f"{cert} or {key} is not a PEM certificate/private key ({exc.reason}); give the PEM files (for certbot: fullchain.pem and privkey.pem).") from None
        raise CertificateError(f"OpenSSL refused the certificate {cert} with key {key} ({exc.reason}); check both files.") from None


def legacy_context(ca_file: Path | None = None, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """Client context for the legacy server: TLS 1.0 up to the highest it offers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1
    if max_version is not None:
        context.maximum_version = max_version
    context.set_ciphers(LEGACY_CIPHERS)
    # Unpatched Windows servers lack RFC 5746 secure renegotiation.
    context.options |= getattr(ssl, "OP_LEGACY_SERVER_CONNECT", 0x4)
    context.set_alpn_protocols(["http/1.1"])
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        # Exchange 2007 certificates are usually self-signed: verified by fingerprint pin instead.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pin_flag(der_fingerprint: str) -> str:
    pairs = ":".join(der_fingerprint[i : i + 2] for i in range(0, len(der_fingerprint), 2))
    return f"--legacy-fingerprint sha256:{pairs.upper()}"


def describe_ssl_error(exc: BaseException) -> str:
    """A short human reason for a failed legacy handshake."""
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    upper = str(reason).upper()
    if "NO_CIPHERS_AVAILABLE" in upper or "NO_SHARED_CIPHER" in upper or "HANDSHAKE_FAILURE" in upper:
        return f"TLS handshake failed ({reason}): the server and this OpenSSL share no cipher suite or protocol version"
    if "UNSUPPORTED_PROTOCOL" in upper or "WRONG_VERSION_NUMBER" in upper:
        return f"TLS handshake failed ({reason}): the server does not speak a TLS version this bridge offers (1.0-1.2), or does not speak TLS on this port"
    if "CERTIFICATE_VERIFY_FAILED" in upper:
        return f"the legacy certificate failed verification against --legacy-ca ({getattr(exc, 'verify_message', reason)})"
    return f"TLS handshake failed ({reason})"
