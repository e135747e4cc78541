"""Fixtures shared by the test modules: a local CA for the bridge's certificate and a lab per module."""

from __future__ import annotations

import pytest

from bridge.certs.keys import LocalCA
from bridge.lab.server import LabOptions
from lab_clients import BackgroundLab


@pytest.fixture(scope="module")
def ca() -> LocalCA:
    """A throwaway CA: the bridge's certificate is issued by it and test clients trust only it."""
    return LocalCA.create()


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """The lab (simulated Exchange 2007, TLS 1.0 only) on its own thread; stop()/start() keep the port."""
    background = BackgroundLab(LabOptions(host="127.0.0.1", port=0, state_dir=tmp_path_factory.mktemp("lab")))
    background.start()
    yield background
    background.shutdown()


@pytest.fixture(scope="module")
def lab(lab_server):
    return lab_server.lab
