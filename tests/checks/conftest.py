"""Host-by-host checks of a gpufleet deploy (testinfra). Each host says what it was meant to be
in /etc/gpufleet/host.json; these checks compare the host with it.

    pytest tests/checks --hosts=ssh://gpu-node-01,ssh://gpu-node-02 [--ssh-config=FILE]
"""

import json

import pytest

from tests.checks.meant import only_where


@pytest.fixture
def intent(host):
    record = host.file("/etc/gpufleet/host.json")
    assert record.exists, "no /etc/gpufleet/host.json: gpufleet has not deployed this host"
    return json.loads(record.content_string)


@pytest.fixture
def docker_host(host, intent):
    """A host meant to run Docker (a GPU host whose engine is Docker)."""
    return only_where(host, intent["docker"], f"not meant to run Docker (groups {intent['groups']})")
