"""`--workers`: the setting from TOML and flags, and each worker's share of --max-connections
(tests/integration/test_workers.py runs the workers)."""

from __future__ import annotations

import os

import pytest


def test_workers_from_toml_and_auto(tmp_path):
    from bridge.config import ConfigError, build_config, load_toml
    from bridge.runtime.workers import connection_share

    config = tmp_path / "bridge.toml"
    config.write_text('fqdn = "ok.example"\nlegacy = ["a.example"]\nworkers = 3\n')
    assert build_config(load_toml(config)).workers == 3
    assert build_config({"fqdn": "ok.example", "legacy": ["a.example"], "workers": "auto"}).workers == min(os.cpu_count() or 1, 64)
    assert build_config({"fqdn": "ok.example", "legacy": ["a.example"]}).workers == 1
    with pytest.raises(ConfigError, match="--workers"):
        build_config({"fqdn": "ok.example", "legacy": ["a.example"], "workers": "many"})
    assert [connection_share(1000, 3, index) for index in range(3)] == [334, 333, 333]
