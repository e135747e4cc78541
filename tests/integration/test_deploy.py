"""Deployment: terraform/azure, its cloud-init, scripts/install.sh and the systemd unit.

Everything runs for real (tests/unit/test_deploy.py parses the .tf files with python-hcl2): Terraform's own `templatefile` renders the
cloud-init (through `terraform console` on the module's variables and locals, which needs no provider),
Terraform evaluates the variable validations, checkov scans the module, shellcheck reads the scripts,
systemd-analyze verifies the unit, and install.sh installs the bridge from this checkout into a
throwaway root. Nothing here reaches Azure or needs `terraform init`.

Tools: terraform, shellcheck and checkov on PATH (or CHECKOV_BIN), systemd-analyze where available;
PyYAML importable. install.sh needs root and PyPI (the bridge's dependencies).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from support import REPO
from support.deploy import AZURE, INSTALL_SH, SCRIPTS, TERRAFORM, UNIT_TEMPLATE, unit_directives

FINGERPRINT = "sha256:" + "ab" * 32
SAMPLE_VARS = {
    "location": "westeurope",
    "fqdn": "bridge.contoso.com",
    "legacy_hosts": ["mail.contoso.com", "203.0.113.10:8443"],
    "acme_email": "it@contoso.com",
    "bridge_package": "exchange-bridge @ git+https://example.org/org/exchange-bridge@v0.1.0",
    "admin_cidrs": ["198.51.100.7/32"],
    "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForTests you@laptop",
    "legacy_fingerprint": FINGERPRINT,
}


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed; the test setup must install it (see the module docstring).")
    return path


def run(cmd: list[str], *, timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{cmd[0]} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


# ----------------------------------------------------------------------------- terraform fmt


def test_terraform_fmt_is_clean():
    terraform = need_tool("terraform")
    result = run([terraform, "fmt", "-check", "-diff", "-recursive", str(TERRAFORM)], timeout=60, check=False, env=_tf_env())
    assert result.returncode == 0, f"terraform fmt would change files:\n{result.stdout}"


# ----------------------------------------------------------------------------- Terraform itself


def _tf_env() -> dict:
    env = dict(os.environ)
    env.update(TF_CLI_CONFIG_FILE=os.devnull, TF_IN_AUTOMATION="1", CHECKPOINT_DISABLE="1")
    return env


@pytest.fixture(scope="module")
def console_module(tmp_path_factory) -> Path:
    """The module's variables and cloud-init locals, laid out as in the repo, without providers."""
    root = tmp_path_factory.mktemp("tfconsole")
    azure = root / "terraform" / "azure"
    azure.mkdir(parents=True)
    for name in ("variables.tf", "cloud_init.tf", "cloud-init.yaml.tftpl"):
        shutil.copy(AZURE / name, azure / name)
    (root / "scripts").symlink_to(SCRIPTS)
    (azure / "sample.tfvars.json").write_text(json.dumps(SAMPLE_VARS))
    return azure


def console(directory: Path, expression: str, *extra_vars: str) -> subprocess.CompletedProcess:
    terraform = need_tool("terraform")
    args = [terraform, "console", "-no-color", "-var-file=sample.tfvars.json"]
    for assignment in extra_vars:
        args += ["-var", assignment]
    return subprocess.run(args, input=expression + "\n", capture_output=True, text=True, timeout=60, cwd=directory, env=_tf_env())


def render_cloud_init(directory: Path, *extra_vars: str) -> str:
    result = console(directory, "base64encode(local.cloud_init)", *extra_vars)
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    return base64.b64decode(result.stdout.strip().strip('"')).decode()


def test_cloud_init_renders_to_valid_yaml(console_module):
    text = render_cloud_init(console_module)
    assert text.startswith("#cloud-config\n")
    document = yaml.safe_load(text)
    files = {entry["path"]: entry for entry in document["write_files"]}
    installer = files["/opt/exchange-bridge/installer/install.sh"]
    unit = files["/opt/exchange-bridge/installer/exchange-bridge.service"]
    assert installer["encoding"] == unit["encoding"] == "b64"
    # The VM gets the very same installer and unit as a hand installation.
    assert base64.b64decode(installer["content"]) == INSTALL_SH.read_bytes()
    assert base64.b64decode(unit["content"]) == UNIT_TEMPLATE.read_bytes()
    assert installer["permissions"] == "0755"

    [command] = document["runcmd"]
    assert command[0] == "/opt/exchange-bridge/installer/install.sh"
    args = command[1:]
    pairs = list(zip(args[::2], args[1::2], strict=False))
    assert ("--package", SAMPLE_VARS["bridge_package"]) in pairs  # the spec with spaces stays one argument
    assert ("--fqdn", "bridge.contoso.com") in pairs
    assert ("--email", "it@contoso.com") in pairs
    assert [v for k, v in pairs if k == "--legacy"] == SAMPLE_VARS["legacy_hosts"]
    assert ("--legacy-fingerprint", FINGERPRINT) in pairs

    # Every flag cloud-init passes is one install.sh documents.
    usage = run(["bash", str(INSTALL_SH), "--help"], timeout=30).stdout
    for flag in args[::2]:
        assert re.search(rf"^\s+{re.escape(flag)}\b", usage, re.M), f"install.sh does not know {flag}"


def test_cloud_init_without_fingerprint(console_module):
    document = yaml.safe_load(render_cloud_init(console_module, "legacy_fingerprint="))
    assert "--legacy-fingerprint" not in document["runcmd"][0]


def test_cloud_init_passes_the_migration_window(console_module):
    for assignment, pair in (("expire_after=14d", ["--expire-after", "14d"]), ("expire_at=2026-12-31T18:00Z", ["--expire-at", "2026-12-31T18:00Z"])):
        args = yaml.safe_load(render_cloud_init(console_module, assignment))["runcmd"][0]
        index = args.index(pair[0])
        assert args[index : index + 2] == pair
    assert not {"--expire-at", "--expire-after"} & set(yaml.safe_load(render_cloud_init(console_module))["runcmd"][0])


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("expire_at=next-friday", "ISO 8601 date or date-time"),
        ("expire_after=14", "a duration such as 14d"),
        ("expire_after=14d", "not both"),
        ("https_from_exchange_online=true", "instead of 0.0.0.0/0"),
        ('admin_cidrs=["0.0.0.0/0"]', "SSH is not opened to the whole internet"),
        ("admin_cidrs=[]", "at least one CIDR block for SSH"),
        ('admin_cidrs=["198.51.100.7/24"]', "network address"),
        ('allowed_cidrs=["not-a-cidr"]', "allowed_cidrs must be a CIDR block"),
        ("fqdn=203.0.113.5", "fully qualified domain name"),
        ("fqdn=Bridge.Contoso.com", "fully qualified domain name"),
        ("acme_email=it.contoso.com", "e-mail address"),
        ('legacy_hosts=["mail.contoso.com:https"]', "HOST:PORT"),
        ("legacy_hosts=[]", "at least one legacy host"),
        ("legacy_fingerprint=abcd", "64 hex digits"),
        ("bridge_package=--index-url=https://evil.example/simple", "not a pip option"),
        ("ssh_public_key=ssh-dss AAAA", "ssh-ed25519 or ssh-rsa"),
        ("dns_zone_name=fabrikam.com", "fqdn must lie inside dns_zone_name"),
        ("dns_zone_name=contoso.com", "together with dns_zone_name"),
    ],
)
def test_variable_validation_refuses(console_module, assignment, message):
    extra = [assignment]
    if assignment == "dns_zone_name=fabrikam.com":
        extra.append("dns_zone_resource_group_name=dns-rg")
    if assignment == "expire_after=14d":
        extra.append("expire_at=2026-12-31")  # both at once
    result = console(console_module, "local.install_args", *extra)
    # terraform console reports a failed validation as an error diagnostic but may still exit 0 (it
    # goes on evaluating), so the diagnostic is what is checked.
    flat = " ".join(result.stderr.replace("│", " ").split())
    assert "Error: Invalid value for variable" in flat, f"{assignment} was accepted: {flat}"
    assert message in flat, flat


def test_variable_validation_accepts_azure_dns(console_module):
    result = console(console_module, "base64encode(jsonencode(local.install_args))", "dns_zone_name=contoso.com", "dns_zone_resource_group_name=dns-rg")
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    args = json.loads(base64.b64decode(result.stdout.strip().strip('"')))
    assert args[:4] == ["--package", SAMPLE_VARS["bridge_package"], "--fqdn", "bridge.contoso.com"]


def test_checkov_has_no_unexplained_failure():
    checkov = os.environ.get("CHECKOV_BIN") or need_tool("checkov")
    # Not --quiet: it would drop the skipped checks, whose reasons are checked below.
    result = run(
        [checkov, "-d", str(AZURE), "--framework", "terraform", "--compact", "-o", "json", "--skip-download"],
        timeout=180,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    terraform_report = next(r for r in reports if r.get("check_type") == "terraform")
    summary = terraform_report["summary"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in terraform_report["results"].get("failed_checks", [])]
    assert summary["failed"] == 0 and not failed, f"checkov failures: {failed}"
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 10 and summary["resource_count"] >= 9
    for check in terraform_report["results"].get("skipped_checks", []):
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"
    # And every skip written in the code carries its reason.
    for path in TERRAFORM.rglob("*.tf"):
        for line in path.read_text().splitlines():
            if "checkov:skip=" in line:
                assert re.search(r"checkov:skip=CKV2?_[A-Z]+_\d+:.{20,}", line), f"{path.name}: skip without reason: {line.strip()}"


# ----------------------------------------------------------------------------- scripts


def test_shellcheck_scripts():
    shellcheck = need_tool("shellcheck")
    scripts = sorted(p for p in SCRIPTS.iterdir() if p.is_file() and (p.suffix == ".sh" or p.read_bytes()[:40].startswith(b"#!/usr/bin/env bash") or p.read_bytes()[:20].startswith(b"#!/bin/")))
    assert INSTALL_SH in scripts
    result = run([shellcheck, "-x", *map(str, scripts)], timeout=120, check=False, cwd=SCRIPTS)
    assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------------------- install.sh for real


def passwd_entries(root: Path, name: str) -> list[list[str]]:
    return [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines() if line.split(":")[0] == name]


def group_id(root: Path, name: str) -> int:
    for line in (root / "etc" / "group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"group {name} missing")


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    """This checkout's package, copied so that pip's in-tree build leaves the work tree alone."""
    target = tmp_path_factory.mktemp("pkg") / "exchange-bridge"
    target.mkdir()
    shutil.copy(REPO / "pyproject.toml", target)
    for optional in ("README.md", "LICENSE"):
        if (REPO / optional).exists():
            shutil.copy(REPO / optional, target)
    shutil.copytree(REPO / "bridge", target / "bridge", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def install(root: Path, package: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        pytest.skip("install.sh creates a system user and sets ownership: it needs root")
    cmd = ["bash", str(INSTALL_SH), "--prefix", str(root), "--python", sys.executable, "--package", str(package), "--no-apt", *args]
    return run(cmd, timeout=400, check=check)


FIRST_INSTALL = ("--fqdn", "Bridge.Contoso.com", "--legacy", "mail.contoso.com", "--legacy", "203.0.113.10:8443", "--email", "it@contoso.com", "--legacy-fingerprint", FINGERPRINT)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, package_copy) -> Path:
    root = tmp_path_factory.mktemp("root")
    result = install(root, package_copy, *FIRST_INSTALL)
    assert "creating system user exchange-bridge" in result.stdout
    return root


def test_install_creates_user_venv_command_config_and_unit(installed):
    root = installed
    [entry] = passwd_entries(root, "exchange-bridge")
    assert entry[5] == "/var/lib/exchange-bridge" and entry[6] == "/usr/sbin/nologin"
    gid = group_id(root, "exchange-bridge")

    command = root / "usr" / "local" / "bin" / "bridge"
    assert command.is_symlink() and command.resolve() == (root / "opt" / "exchange-bridge" / "venv" / "bin" / "bridge").resolve()
    version = run([str(command), "--version"], timeout=60).stdout
    assert version.startswith("bridge ")

    etc = root / "etc" / "exchange-bridge"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750 and (etc.stat().st_uid, etc.stat().st_gid) == (0, gid)
    config = etc / "bridge.toml"
    info = config.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640 and (info.st_uid, info.st_gid) == (0, gid)
    settings = tomllib.loads(config.read_text())
    assert settings == {
        "fqdn": "bridge.contoso.com",
        "legacy": ["mail.contoso.com", "203.0.113.10:8443"],
        "acme_email": "it@contoso.com",
        "legacy_fingerprint": FINGERPRINT,
    }
    # The installed bridge reads the file the way `bridge up --config` will.
    check = (
        "import sys; from pathlib import Path; from bridge.config import build_config, load_toml;"
        "c = build_config(load_toml(Path(sys.argv[1]))); print(c.fqdn, *map(str, c.legacy), c.legacy_fingerprint)"
    )
    python = root / "opt" / "exchange-bridge" / "venv" / "bin" / "python"
    out = run([str(python), "-c", check, str(config)], timeout=60).stdout.split()
    assert out == ["bridge.contoso.com", "mail.contoso.com:443", "203.0.113.10:8443", "ab" * 32]

    unit = unit_directives((root / "etc" / "systemd" / "system" / "exchange-bridge.service").read_text())
    assert unit["Service.ExecStart"] == [f"{root}/opt/exchange-bridge/venv/bin/bridge up --config {root}/etc/exchange-bridge/bridge.toml --state-dir /var/lib/exchange-bridge"]
    assert unit["Service.StateDirectory"] == ["exchange-bridge"]


def test_installed_unit_passes_systemd_analyze_verify(installed):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed on this machine (package systemd); the unit's directives are still checked above")
    unit = installed / "etc" / "systemd" / "system" / "exchange-bridge.service"
    result = run([analyze, "verify", str(unit)], timeout=60, check=False)
    messages = [line for line in (result.stdout + result.stderr).splitlines() if "exchange-bridge" in line]
    assert result.returncode == 0 and not messages, result.stdout + result.stderr


def test_install_again_keeps_settings_then_overwrites_on_request(installed, package_copy):
    root = installed
    config = root / "etc" / "exchange-bridge" / "bridge.toml"
    config.write_text(config.read_text() + "log_level = \"debug\"\n")  # a consultant's edit
    before = config.read_text()

    again = install(root, package_copy, "--fqdn", "other.contoso.com", "--legacy", "mail2.contoso.com")
    assert "user exchange-bridge exists" in again.stdout and "using the existing venv" in again.stdout
    assert "keeping the existing" in again.stdout
    assert config.read_text() == before
    assert len(passwd_entries(root, "exchange-bridge")) == 1

    # Settings the bridge itself refuses (port out of range) leave the file untouched.
    refused = install(root, package_copy, "--overwrite-config", "--fqdn", "other.contoso.com", "--legacy", "mail2.contoso.com:99999", check=False)
    assert refused.returncode != 0 and "invalid port" in refused.stderr
    assert config.read_text() == before
    assert not list(config.parent.glob(".bridge.toml.*")), "temporary file left behind"

    install(root, package_copy, "--overwrite-config", "--fqdn", "other.contoso.com", "--legacy", "mail2.contoso.com", "--acme-directory", "letsencrypt-staging")
    assert tomllib.loads(config.read_text()) == {"fqdn": "other.contoso.com", "legacy": ["mail2.contoso.com"], "acme_directory": "letsencrypt-staging"}
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


NAMESPACE_SCRIPT = r"""
set -eu
mount --bind "$WORK/etc" /etc          # useradd and the settings land in a copy of /etc
mount -t tmpfs tmpfs /opt              # the venv
mount -t tmpfs tmpfs /usr/local/bin    # the bridge command
bash "$INSTALL_SH" --package "$PACKAGE" --python "$PYTHON" --no-apt \
    --fqdn bridge.contoso.com --legacy mail.contoso.com --email it@contoso.com
echo "passwd: $(getent passwd exchange-bridge)"
echo "group: $(stat -c %G /etc/exchange-bridge/bridge.toml) $(stat -c %a /etc/exchange-bridge/bridge.toml)"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin  # root's PATH on a Debian VM
echo "which: $(command -v bridge) $(bridge --version)"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /etc/systemd/system/exchange-bridge.service 2>&1 | sed 's/^/verify: /'
    echo "verify-rc: ${PIPESTATUS[0]}"
fi
cmp /etc/systemd/system/exchange-bridge.service "$UNIT_TEMPLATE" && echo "unit: as shipped"
"""


def test_install_at_the_real_paths_in_a_private_mount_namespace(tmp_path, package_copy):
    """The default (no --prefix) path, as on a VM: getent/useradd on /etc, /opt, /usr/local/bin.

    The host is not touched: /etc is a copy and /opt, /usr/local/bin are empty tmpfs, all inside a
    mount namespace that ends with the command.
    """
    if os.geteuid() != 0:
        pytest.skip("install.sh needs root")
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m refused); the --prefix install above covers the rest")
    host_passwd = Path("/etc/passwd").read_bytes()
    shutil.copytree("/etc", tmp_path / "etc", symlinks=True, ignore_dangling_symlinks=True)
    env = dict(os.environ, WORK=str(tmp_path), INSTALL_SH=str(INSTALL_SH), PACKAGE=str(package_copy), PYTHON=sys.executable, UNIT_TEMPLATE=str(UNIT_TEMPLATE))
    result = run([unshare, "-m", "--propagation", "private", "bash", "-c", NAMESPACE_SCRIPT], timeout=400, env=env)
    out = result.stdout
    assert "creating system user exchange-bridge" in out
    assert re.search(r"^passwd: exchange-bridge:x:\d+:\d+:[^:]*:/var/lib/exchange-bridge:/usr/sbin/nologin$", out, re.M), out
    assert "group: exchange-bridge 640" in out
    assert re.search(r"^which: /usr/local/bin/bridge bridge \S+$", out, re.M), out
    assert "unit: as shipped" in out
    if "verify-rc:" in out:
        assert "verify-rc: 0" in out and "verify: " not in out, out
    assert Path("/etc/passwd").read_bytes() == host_passwd, "the host's /etc was changed"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--legacy", "mail.contoso.com"), "give --fqdn"),
        (("--fqdn", "bridge.contoso.com"), "give --legacy"),
        (("--fqdn", "203.0.113.5", "--legacy", "mail.contoso.com"), "is not a fully qualified domain name"),
        (("--fqdn", "bridge.contoso.com", "--legacy", "mail.contoso.com", "--email", "nobody"), "is not an e-mail address"),
        (("--fqdn", "bridge.contoso.com", "--legacy", "mail.contoso.com", "--legacy-fingerprint", "sha1:00"), "64 hex digits"),
        (("--bogus",), "unknown option '--bogus'"),
    ],
)
def test_install_refuses_bad_input_before_touching_anything(tmp_path, package_copy, args, message):
    root = tmp_path / "root"
    result = install(root, package_copy, *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not root.exists(), "install.sh changed the root before refusing"
