"""Deployment files read in-process: terraform/azure parsed with python-hcl2 (resources, NSG rules,
variables, outputs), the systemd unit's directives, docs/deploy.md. (tests/integration/test_deploy.py
runs Terraform, checkov, shellcheck, systemd-analyze and install.sh.)"""

from __future__ import annotations

from pathlib import Path

import hcl2
import pytest
from support import REPO
from support.deploy import AZURE, TERRAFORM, UNIT_TEMPLATE, unit_directives

# ----------------------------------------------------------------------------- HCL


def _unquote(value):
    """Normalise python-hcl2 output: strip the quotes some versions keep around keys and strings."""
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k not in ("__is_block__", "__comments__", "__inline_comments__")}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_hcl(path: Path) -> dict:
    text = path.read_text()
    options = getattr(hcl2, "SerializationOptions", None)
    if options is not None:
        data = hcl2.loads(text, serialization_options=options(with_comments=False, explicit_blocks=False, strip_string_quotes=True))
    else:  # python-hcl2 < 8
        data = hcl2.loads(text)
    return _unquote(data)


@pytest.fixture(scope="module")
def module() -> dict:
    """All blocks of terraform/azure by kind: resources[(type, name)], variables[name], outputs[name]."""
    merged: dict = {"resources": {}, "variables": {}, "outputs": {}, "locals": {}, "terraform": []}
    for path in sorted(AZURE.glob("*.tf")):
        data = parse_hcl(path)
        for block in data.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    merged["resources"][(rtype, name)] = body
        for block in data.get("variable", []):
            merged["variables"].update(block)
        for block in data.get("output", []):
            merged["outputs"].update(block)
        for block in data.get("locals", []):
            merged["locals"].update(block)
        merged["terraform"].extend(data.get("terraform", []))
    return merged


def one(module: dict, rtype: str) -> dict:
    bodies = [body for (t, _), body in module["resources"].items() if t == rtype]
    assert len(bodies) == 1, f"expected one {rtype}, found {len(bodies)}"
    return bodies[0]


def first_block(body: dict, name: str) -> dict:
    block = body.get(name)
    assert block, f"block {name} missing"
    return block[0] if isinstance(block, list) else block


def test_every_tf_file_parses():
    files = sorted(TERRAFORM.rglob("*.tf"))
    assert {p.name for p in files} >= {"main.tf", "variables.tf", "outputs.tf", "versions.tf", "cloud_init.tf"}
    for path in files:
        assert parse_hcl(path), f"{path} parsed to nothing"


def test_provider_and_version_pinned(module):
    terraform_block = module["terraform"][0]
    assert terraform_block["required_version"].startswith(">=")
    azurerm = first_block(terraform_block, "required_providers")["azurerm"]
    assert azurerm["source"] == "hashicorp/azurerm"
    assert azurerm["version"]


def test_resources(module):
    resources = module["resources"]
    types = {t for t, _ in resources}
    for required in (
        "azurerm_resource_group",
        "azurerm_virtual_network",
        "azurerm_subnet",
        "azurerm_network_security_group",
        "azurerm_subnet_network_security_group_association",
        "azurerm_public_ip",
        "azurerm_network_interface",
        "azurerm_linux_virtual_machine",
        "azurerm_dns_a_record",
    ):
        assert required in types, f"{required} missing"

    ip = one(module, "azurerm_public_ip")
    assert (ip["allocation_method"], ip["sku"]) == ("Static", "Standard")

    nic = one(module, "azurerm_network_interface")
    assert "azurerm_public_ip.bridge.id" in first_block(nic, "ip_configuration")["public_ip_address_id"]

    association = one(module, "azurerm_subnet_network_security_group_association")
    assert "azurerm_network_security_group" in association["network_security_group_id"]
    assert "azurerm_subnet" in association["subnet_id"]

    vm = one(module, "azurerm_linux_virtual_machine")
    assert vm["size"] == "${var.vm_size}"
    assert vm["disable_password_authentication"] is True
    assert "admin_password" not in vm
    assert "var.ssh_public_key" in first_block(vm, "admin_ssh_key")["public_key"]
    assert "local.cloud_init" in vm["custom_data"] and "base64encode" in vm["custom_data"]
    image_local = module["locals"]["images"]
    publishers = {image["publisher"] for image in image_local.values()}
    assert publishers <= {"Debian", "Canonical"} and "Debian" in publishers
    assert set(image_local) == {"debian-12", "ubuntu-24.04"}

    cloud_init = module["locals"]["cloud_init"]
    assert "templatefile(" in cloud_init and "cloud-init.yaml.tftpl" in cloud_init
    assert "scripts/install.sh" in cloud_init and "scripts/exchange-bridge.service" in cloud_init

    record = one(module, "azurerm_dns_a_record")
    assert "var.dns_zone_name == null ? 0 : 1" in record["count"]
    assert "azurerm_public_ip.bridge" in record["target_resource_id"]


def test_nsg_rules(module):
    nsg = one(module, "azurerm_network_security_group")
    rules = nsg["security_rule"]
    by_port = {rule["destination_port_range"]: rule for rule in rules}
    assert set(by_port) == {"443", "80", "22"}, "exactly HTTPS, HTTP (ACME) and SSH are opened"
    assert len({rule["priority"] for rule in rules}) == len(rules)
    for rule in rules:
        assert (rule["direction"], rule["access"], rule["protocol"]) == ("Inbound", "Allow", "Tcp")
    assert by_port["443"]["source_address_prefixes"] == "${local.https_sources}"
    # allowed_cidrs, plus Exchange Online's IPv4 ranges from the package's snapshot with https_from_exchange_online.
    https_sources = module["locals"]["https_sources"]
    assert "var.https_from_exchange_online ?" in https_sources and "local.exchange_online_ranges" in https_sources and https_sources.endswith(": var.allowed_cidrs}")
    ranges = module["locals"]["exchange_online_ranges"]
    assert "bridge/ops/data/exchange-online.json" in ranges and 'strcontains(cidr, ":")' in ranges
    assert by_port["443"].get("source_address_prefix") is None
    assert by_port["80"]["source_address_prefix"] == "*"
    ssh = by_port["22"]
    assert ssh["source_address_prefixes"] == "${var.admin_cidrs}"
    assert ssh.get("source_address_prefix") is None, "SSH must come from admin_cidrs only"


def test_variables(module):
    variables = module["variables"]
    for name, body in variables.items():
        assert len(body.get("description", "")) > 20, f"variable {name} has no real description"
    expected = {
        "fqdn", "legacy_hosts", "legacy_fingerprint", "acme_email", "acme_directory", "bridge_package",
        "allowed_cidrs", "admin_cidrs", "location", "vm_size", "ssh_public_key", "admin_username",
        "dns_zone_name", "dns_zone_resource_group_name",
    }  # fmt: skip
    assert expected <= set(variables)
    for name in ("fqdn", "legacy_hosts", "acme_email", "allowed_cidrs", "admin_cidrs", "bridge_package", "ssh_public_key", "dns_zone_name", "legacy_fingerprint"):
        assert variables[name].get("validation"), f"variable {name} has no validation"
    assert variables["allowed_cidrs"]["default"] == ["0.0.0.0/0"]
    assert variables["https_from_exchange_online"]["default"] is False, "the NSG follows allowed_cidrs unless asked"
    assert variables["expire_at"]["default"] == variables["expire_after"]["default"] == ""
    for name in ("expire_at", "expire_after"):
        assert variables[name].get("validation"), f"variable {name} has no validation"
    assert "default" not in variables["admin_cidrs"], "SSH sources must be given, never defaulted"
    assert variables["vm_size"]["default"].startswith("Standard_")
    assert variables["dns_zone_name"]["default"] is None


def test_outputs(module):
    outputs = module["outputs"]
    assert {"public_ip", "dns_record", "ssh_command", "next_steps"} <= set(outputs)
    for name, body in outputs.items():
        assert body.get("description"), f"output {name} has no description"
    assert "azurerm_public_ip.bridge.ip_address" in outputs["public_ip"]["value"]
    assert outputs["ssh_command"]["value"].startswith("ssh ${var.admin_username}@")
    dns_record = outputs["dns_record"]["value"]
    assert dns_record["type"] == "A" and "ip_address" in dns_record["value"]
    next_steps = outputs["next_steps"]["value"]
    assert "bridge preflight" in next_steps and "terraform destroy" in next_steps


# ----------------------------------------------------------------------------- the unit and the docs


def test_unit_file_directives():
    unit = unit_directives(UNIT_TEMPLATE.read_text())
    assert unit["Service.ExecStart"] == ["/opt/exchange-bridge/venv/bin/bridge up --config /etc/exchange-bridge/bridge.toml --state-dir /var/lib/exchange-bridge"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.User"] == ["exchange-bridge"] and unit["Service.Group"] == ["exchange-bridge"]
    assert unit["Service.AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.StateDirectory"] == ["exchange-bridge"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_deploy_doc_covers_the_steps():
    text = (REPO / "docs" / "deploy.md").read_text()
    for needle in ("terraform apply", "terraform destroy", "bridge preflight", "scripts/install.sh", "Standard_B2s", "a day"):
        assert needle in text, needle
