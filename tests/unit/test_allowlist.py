"""--allow exchange-online: the packaged snapshot, the endpoints web service's JSON, validation and the
expansion (tests/integration/test_allowlist.py runs `bridge allow refresh` and a bridge)."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from bridge.config import ConfigError, build_config
from bridge.errors import AllowListError
from bridge.ops import allowlist
from bridge.ops.allowlist import PACKAGED, STATE_FILE, current_list, describe, exchange_ips, expand_allow, store, validate_ranges

BASE = {"fqdn": "ok.example", "legacy": ["a.example"]}


def test_packaged_snapshot_names_its_source_and_date_and_holds_the_published_ranges():
    data = json.loads(PACKAGED.read_text())
    assert data["source"].startswith("https://endpoints.office.com/endpoints/worldwide?")
    assert "clientrequestid=" in data["source"]
    assert len(data["date"]) == 10 and "bridge allow refresh" in data["note"]
    ranges = validate_ranges(data["ranges"], "the snapshot")
    for published in (
        "40.92.0.0/15",
        "40.107.0.0/16",
        "52.100.0.0/14",
        "104.47.0.0/17",
        "40.96.0.0/13",
        "52.96.0.0/14",
        "132.245.0.0/16",
        "2a01:111:f400::/48",
        "2a01:111:f403::/48",
        "2603:1006::/40",
        "2620:1ec:8f0::/46",
    ):
        assert ipaddress.ip_network(published) in ranges
    assert {network.version for network in ranges} == {4, 6}


def test_allow_keyword_stays_a_word_and_expands_beside_other_sources(tmp_path):
    config = build_config({**BASE, "allow": ["Exchange-Online", "198.51.100.7"], "state_dir": str(tmp_path)})
    assert config.allow == ("exchange-online", ipaddress.ip_network("198.51.100.7/32"))
    networks = expand_allow(config.allow, tmp_path)
    assert ipaddress.ip_network("40.92.0.0/15") in networks and ipaddress.ip_network("198.51.100.7/32") in networks
    assert expand_allow((ipaddress.ip_network("10.0.0.0/8"),), tmp_path) == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ConfigError, match="not an address, a CIDR range or exchange-online"):
        build_config({**BASE, "allow": ["exchange_online"]})


def test_a_refreshed_list_in_the_state_dir_wins_over_an_older_snapshot(tmp_path):
    ranges = validate_ranges(["127.0.0.2/32", "192.0.2.0/24", "2001:db8::/32"], "test")
    path = store(tmp_path, "https://endpoints.test/list", ranges)
    assert path == tmp_path / STATE_FILE and oct(path.stat().st_mode & 0o777) == "0o644"
    listed = current_list(tmp_path)
    assert listed.path == path and listed.ranges == ranges and not listed.packaged
    assert ipaddress.ip_network("127.0.0.2/32") in expand_allow(("exchange-online",), tmp_path)
    info = describe(("exchange-online",), tmp_path)["exchange_online"]
    assert info["ranges"] == 3 and info["ipv4"] == 2 and info["source"] == "https://endpoints.test/list"
    # An older refreshed list gives way to a newer packaged snapshot.
    data = json.loads(path.read_text())
    data["date"] = "2000-01-01"
    path.write_text(json.dumps(data))
    os.utime(path, ns=(1, 1))
    assert current_list(tmp_path).packaged
    # A broken file is logged and the snapshot used.
    path.write_text("{not json")
    assert current_list(tmp_path).packaged
    assert describe((), tmp_path) == {"sources": [], "exchange_online": None}


def endpoint_sets(*sets: dict) -> bytes:
    return json.dumps(list(sets)).encode()


def test_exchange_ips_from_the_endpoints_web_service_answer():
    answer = endpoint_sets(
        {"id": 1, "serviceArea": "Exchange", "urls": ["outlook.office.com"], "ips": ["13.107.6.152/31", "2603:1006::/40"], "tcpPorts": "80,443"},
        {"id": 9, "serviceArea": "Exchange", "ips": ["40.92.0.0/15"], "tcpPorts": "25"},
        {"id": 10, "serviceArea": "Exchange", "urls": ["*.mail.protection.outlook.com"]},  # no ips
        {"id": 46, "serviceArea": "SharePoint", "ips": ["13.107.136.0/22"]},
        {"id": 56, "serviceArea": "Common", "ips": ["20.190.128.0/18"]},
    )
    assert exchange_ips(answer, "The service") == ["13.107.6.152/31", "2603:1006::/40", "40.92.0.0/15"]


@pytest.mark.parametrize(
    "answer, fragment",
    [
        (b"<html>maintenance</html>", "did not answer JSON"),
        (b'{"error": "bad clientrequestid"}', "did not answer a JSON list of endpoint sets"),
        (endpoint_sets({"serviceArea": "SharePoint", "ips": ["13.107.136.0/22"]}), "lists no Exchange address ranges"),
        (b"[]", "lists no Exchange address ranges"),
    ],
)
def test_unusable_answers_are_one_sentence(answer, fragment):
    with pytest.raises(AllowListError) as caught:
        exchange_ips(answer, "The endpoints service at https://endpoints.test/list")
    message = str(caught.value)
    assert fragment in message and message.endswith("; the bridge keeps its current list.")


@pytest.mark.parametrize(
    "ranges, fragment",
    [
        (["40.92.0.0/15", "not-an-ip", "10.0.0.0/8"], "'not-an-ip', which is not an address range"),
        (["0.0.0.0/0", "40.92.0.0/15", "10.0.0.0/8"], "0.0.0.0/0, which is implausibly broad"),
        (["::/0", "40.92.0.0/15", "10.0.0.0/8"], "::/0, which is implausibly broad"),
        (["40.92.0.0/15"], "1 Exchange address ranges, which is implausible"),
        ([f"10.{i // 256}.{i % 256}.0/24" for i in range(allowlist.MAX_RANGES + 1)], "which is implausible"),
    ],
)
def test_implausible_lists_are_refused(ranges, fragment):
    with pytest.raises(AllowListError, match="keeps its current list") as caught:
        validate_ranges(ranges, "The service")
    assert fragment in str(caught.value)
