"""Every error a user can cause, in one place: one base class, one sentence each.

The `bridge` command prints ``str(error)`` of a ``UserError`` on one line and exits 2; anything else is
a defect and is reported as such. Each subclass says which part of the work refused, so callers can
catch only what they handle (a bad file on SIGHUP keeps the running configuration, say).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake or a condition the user can fix; str() is one sentence saying what happened and what to do."""


class ConfigError(UserError):
    """A setting (flag or TOML key) is missing or wrong."""


class StartupError(UserError):
    """The bridge (or the lab) cannot start: a port in use, an address not of this machine."""


class CertificateError(UserError):
    """The front-end certificate or key cannot be used."""


class AcmeError(UserError):
    """Obtaining or renewing the certificate over ACME failed."""


class PreflightUsageError(UserError):
    """A preflight flag is missing or wrong."""


class AllowListError(UserError):
    """Exchange Online's address list could not be fetched, read or trusted (`bridge allow refresh`)."""
