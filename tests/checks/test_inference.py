"""Inference services: each unit enabled and running, its port listening, its readiness endpoints
answering on the host (with the API key from where host.json says it is), its secrets out of the unit
(and, when the engine reads its key from a file, out of `docker inspect`)."""

import pytest


@pytest.fixture
def services(host, intent):
    started = [s for s in intent.get("services", []) if s["started"]]
    if not started:
        pytest.skip(f"{host.backend.get_hostname()}: no inference service meant to run here")
    return started


def probe(service):
    """Where the host reaches the service: the address it listens on, or loopback when that is all of them."""
    address = service.get("listen", "0.0.0.0")
    return "127.0.0.1" if address in ("0.0.0.0", "::") else address


def read_key(service):
    """Shell that sets $key to the service's API key, read where host.json says it is (empty without one)."""
    if not service.get("api_key_at"):
        return "key="
    if service["api_key_var"]:
        return f"key=$(sed -n 's/^{service['api_key_var']}=//p' {service['api_key_at']} 2>/dev/null | head -1)"
    return f"key=$(head -1 {service['api_key_at']} 2>/dev/null)"


def test_units_enabled_and_running(host, services):
    for service in services:
        unit = host.service(f"gpufleet-{service['name']}")
        assert unit.is_enabled, service["name"]
        assert unit.is_running, service["name"]


def test_ports_listening(host, services):
    for service in services:
        assert host.socket(f"tcp://{service.get('listen', '0.0.0.0')}:{service['port']}").is_listening, service["name"]


def test_readiness_endpoints_answer(host, services):
    for service in services:
        for path in service["ready"]:
            check = host.run(f"{read_key(service)}; "
                             f"curl -sf -o /dev/null -w '%{{http_code}}' ${{key:+-H \"Authorization: Bearer $key\"}} "
                             f"http://{probe(service)}:{service['port']}{path}")
            assert check.stdout == "200", f"{service['name']} {path}: {check.stdout or check.stderr}"


def test_keyed_services_refuse_requests_without_key(host, services):
    for service in services:
        if service["api_key"] and "/v1/models" in service["ready"]:
            code = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' http://{probe(service)}:{service['port']}/v1/models")
            assert code.stdout == "401", service["name"]


def test_secrets_root_only_and_not_in_units(host, services):
    for service in services:
        if not service["api_key"]:
            continue
        stored = host.file(service["api_key_at"])
        if service["api_key_var"]:  # the root-only environment file
            assert (stored.mode, stored.user) == (0o600, "root")
        else:  # a key file only the service's own account reads (mounted read-only)
            assert stored.mode == 0o400 and stored.uid == int(service["user"].split(":")[0])
        secret = host.run(f"{read_key(service)}; printf %s \"$key\"").stdout
        assert secret and secret not in host.file(f"/etc/systemd/system/gpufleet-{service['name']}.service").content_string
        if not service["api_key_var"]:  # in no environment: not in docker inspect either
            assert secret not in host.run(f"docker inspect gpufleet-{service['name']}").stdout, service["name"]
