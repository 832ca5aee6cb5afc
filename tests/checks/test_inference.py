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
            check = host.run(
                f"{read_key(service)}; "
                f"curl -sf -o /dev/null -w '%{{http_code}}' ${{key:+-H \"Authorization: Bearer $key\"}} "
                f"http://{probe(service)}:{service['port']}{path}"
            )
            assert check.stdout == "200", f"{service['name']} {path}: {check.stdout or check.stderr}"


def test_keyed_services_refuse_requests_without_key(host, services):
    for service in services:
        if service["api_key"] and "/v1/models" in service["ready"]:
            code = host.run(
                f"curl -s -o /dev/null -w '%{{http_code}}' http://{probe(service)}:{service['port']}/v1/models"
            )
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
        secret = host.run(f'{read_key(service)}; printf %s "$key"').stdout
        assert (
            secret and secret not in host.file(f"/etc/systemd/system/gpufleet-{service['name']}.service").content_string
        )
        if not service["api_key_var"]:  # in no environment: not in docker inspect either
            assert secret not in host.run(f"docker inspect gpufleet-{service['name']}").stdout, service["name"]


def test_proxies_running_and_refusing_requests_without_the_key(host, services):
    """A service behind its authenticating TLS front: the front's unit runs, listens where host.json
    says, speaks TLS only with a certificate the site's CA verifies, refuses a keyless request and
    serves one with the key (read from its root-only file)."""
    proxied = [service for service in services if service.get("proxy")]
    if not proxied:
        pytest.skip(f"{host.backend.get_hostname()}: no service behind a proxy here")
    for service in proxied:
        proxy = service["proxy"]
        assert host.service(f"gpufleet-{service['name']}-proxy").is_running, service["name"]
        assert host.socket(f"tcp://{proxy['listen']}:{proxy['port']}").is_listening, service["name"]
        stored = host.file(proxy["api_key_at"])
        assert (stored.mode, stored.user) == (0o400, "root"), service["name"]
        certificate = host.file(proxy["pem_at"])
        assert (certificate.mode, certificate.user) == (0o600, "root"), service["name"]
        url = f"https://{probe(proxy)}:{proxy['port']}{service['ready'][0]}"
        curl = f"curl -s -o /dev/null -w '%{{http_code}}' --cacert {proxy['ca_at']}"
        keyless = host.run(f"{curl} {url}")
        keyed = host.run(f'key=$(head -1 {proxy["api_key_at"]}); {curl} -H "Authorization: Bearer $key" {url}')
        plain = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' http://{probe(proxy)}:{proxy['port']}/")
        assert (keyless.stdout, keyed.stdout) == ("401", "200"), service["name"]
        assert plain.stdout in ("000", "400"), service["name"]  # TLS only


def test_firewall_table_loaded_from_its_file_for_every_service_port(host, intent, services):
    """gpufleet's nftables table is loaded, is the one its file describes (the digest it carries), and
    lists every service port and proxy port of host.json."""
    if not intent.get("firewall"):
        pytest.skip(f"{host.backend.get_hostname()}: inference_firewall is off here")
    rules = host.file("/etc/gpufleet/firewall.nft").content_string
    digest = next(line.split('"')[1] for line in rules.splitlines() if line.strip().startswith("comment"))
    loaded = host.run("nft list table inet gpufleet")
    assert loaded.rc == 0 and f'comment "{digest}"' in loaded.stdout
    assert host.service("gpufleet-firewall").is_enabled
    ports = {service["port"] for service in services} | {s["proxy"]["port"] for s in services if s.get("proxy")}
    listed = loaded.stdout.split("set inference_ports")[1].split("elements = {")[1].split("}")[0]
    assert {int(port) for port in listed.split(",")} >= ports


def test_engine_caches_are_the_services_own_and_mounted(host, services):
    """An engine that compiles (vLLM) keeps its caches in its own directory on the host (its account's,
    0700), mounted at /cache in its container, so a restart starts warm; a service whose engine keeps
    none has no such directory."""
    for service in services:
        if not service.get("caches"):
            assert not host.file(f"/var/cache/gpufleet/{service['name']}").exists, service["name"]
            continue
        directory = host.file(service["caches"])
        assert directory.is_directory and directory.mode == 0o700, service["name"]
        assert directory.uid == int(service["user"].split(":")[0]), service["name"]
        mounted = host.run(
            f"docker inspect -f '{{{{range .Mounts}}}}{{{{.Source}}}}:{{{{.Destination}}}} {{{{end}}}}' "
            f"gpufleet-{service['name']}"
        ).stdout.split()
        assert f"{service['caches']}:/cache" in mounted, service["name"]
