"""`bridge preflight`'s settings from the command line, in-process: the password's sources and the
usage errors (tests/integration/test_preflight.py runs the checks and the command)."""

from __future__ import annotations

import pytest
from support.lab import LAB_USER
from support.preflight import EMAIL, parse

from bridge.errors import PreflightUsageError
from bridge.preflight.command import settings_from_args


def test_password_comes_from_the_named_variable_or_the_prompt(monkeypatch):
    monkeypatch.setenv("PREFLIGHT_TEST_PASSWORD", "from-env")
    settings = settings_from_args(parse("--legacy", "owa.example.com", "--email", EMAIL, "--username", LAB_USER, "--password-env", "PREFLIGHT_TEST_PASSWORD"))
    assert settings.credentials.password == "from-env" and "from-env" not in repr(settings)
    prompted = settings_from_args(parse("--legacy", "owa.example.com", "--email", EMAIL, "--username", LAB_USER), read_password=lambda user: f"typed for {user}")
    assert prompted.credentials.password == f"typed for {LAB_USER}"


@pytest.mark.parametrize(
    "argv, words",
    [
        ((), "No legacy server given"),
        (("--legacy", "owa.example.com", "--email", EMAIL), "--email and --username go together"),
        (("--legacy", "owa.example.com", "--email", EMAIL, "--username", "u", "--password-env", "PREFLIGHT_UNSET_VARIABLE"), "PREFLIGHT_UNSET_VARIABLE"),
        (("--legacy", "owa.example.com", "--fqdn", "bridge.example.com", "--bridge-addr", "bridge.example.com"), "is not an IP address"),
        (("--legacy", "owa.example.com", "--bridge-addr", "192.0.2.1"), "give its name with --fqdn"),
        (("--legacy", "owa.example.com", "--ca-bundle", "/nonexistent/ca.pem"), "--ca-bundle"),
        (("--legacy", "owa.example.com", "--https-port", "70000"), "--https-port"),
        (("--legacy", "owa.example.com", "--timeout", "0"), "--timeout"),
        (("--legacy", "owa.example.com", "--json", "/nonexistent/dir/report.json"), "does not exist"),
    ],
)
def test_usage_errors_are_one_sentence(argv, words, monkeypatch):
    monkeypatch.delenv("PREFLIGHT_UNSET_VARIABLE", raising=False)
    with pytest.raises(PreflightUsageError) as caught:
        settings_from_args(parse(*argv), read_password=lambda user: pytest.fail("no prompt expected"))
    message = str(caught.value)
    assert words in message and message.endswith(".") and "\n" not in message
