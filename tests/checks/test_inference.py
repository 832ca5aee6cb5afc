"""Inference services: each unit enabled and running, its port listening, its readiness endpoints
answering on the host (with the API key from the root-only env file), its secrets out of the unit."""

import pytest


@pytest.fixture
def services(host, intent):
    started = [s for s in intent.get("services", []) if s["started"]]
    if not started:
        pytest.skip(f"{host.backend.get_hostname()}: no inference service meant to run here")
    return started


def test_units_enabled_and_running(host, services):
    for service in services:
        unit = host.service(f"gpufleet-{service['name']}")
        assert unit.is_enabled, service["name"]
        assert unit.is_running, service["name"]


def test_ports_listening(host, services):
    for service in services:
        assert host.socket(f"tcp://0.0.0.0:{service['port']}").is_listening, service["name"]


def test_readiness_endpoints_answer(host, services):
    for service in services:
        for path in service["ready"]:
            env = f"/etc/gpufleet/secrets/{service['name']}.env"
            check = host.run(f"key=$(cut -d= -f2- {env} 2>/dev/null | head -1); "
                             f"curl -sf -o /dev/null -w '%{{http_code}}' ${{key:+-H \"Authorization: Bearer $key\"}} "
                             f"http://127.0.0.1:{service['port']}{path}")
            assert check.stdout == "200", f"{service['name']} {path}: {check.stdout or check.stderr}"


def test_keyed_services_refuse_requests_without_key(host, services):
    for service in services:
        if service["api_key"] and "/v1/models" in service["ready"]:
            code = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{service['port']}/v1/models")
            assert code.stdout == "401", service["name"]


def test_secrets_root_only_and_not_in_units(host, services):
    for service in services:
        if not service["api_key"]:
            continue
        env = host.file(f"/etc/gpufleet/secrets/{service['name']}.env")
        assert (env.mode, env.user) == (0o600, "root")
        secret = env.content_string.split("=", 1)[1].strip()
        assert secret not in host.file(f"/etc/systemd/system/gpufleet-{service['name']}.service").content_string
