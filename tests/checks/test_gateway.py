"""The site's gateway, on a host whose host.json says it is one: HAProxy runs gpufleet's configuration,
listens on its port with TLS the site's CA verifies, answers 404 for no service, keeps every pool's
keys root-only, and its runtime API sees every member of every pool UP."""

import pytest

from tests.checks.meant import only_where


@pytest.fixture
def gateway(host, intent):
    return only_where(host, intent.get("gateway"), "not a gateway (not in gateway_hosts)") and intent["gateway"]


def test_gateway_serves_its_pools_with_tls_and_every_member_up(host, gateway):
    assert host.service("haproxy").is_running and host.service("haproxy").is_enabled
    assert host.file("/etc/haproxy/haproxy.cfg").content_string.startswith("# Managed by gpufleet: the site's gateway")
    address = "127.0.0.1" if gateway["listen"] in ("0.0.0.0", "::") else gateway["listen"]
    assert host.socket(f"tcp://{gateway['listen']}:{gateway['port']}").is_listening
    nothing = host.run(
        f"curl -s -o /dev/null -w '%{{http_code}}' --cacert {gateway['ca_at']} https://{address}:{gateway['port']}/"
    )
    assert nothing.stdout == "404", nothing.stderr
    for pool, members in gateway["pools"].items():
        keys = host.file(f"/etc/gpufleet/secrets/gateway-{pool}.keys")
        assert (keys.mode, keys.user) == (0o600, "root"), pool
        for member in members:
            state = host.run(f"/usr/local/lib/gpufleet/gpufleet-gateway-ctl state {pool} {member}")
            assert "(UP" in state.stdout, state.stdout
