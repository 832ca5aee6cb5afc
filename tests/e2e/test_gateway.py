"""
The site's gateway on the lab: lab-2 in gateway_hosts (GPUFLEET_LAB_GATEWAY), lab-1 and lab-2 serving
llama.cpp's chat behind their TLS fronts (8443), the gateway on 9443 pooling them. A client on
lab-ubu-1 that trusts the site's CA reaches the service at one URL with its key; a rolling restart of
both hosts under a client's steady requests fails none of them (each host drained at the gateway,
then readmitted once its checks see it up); a host whose engine stops is out of the pool within a few
seconds and the other serves. Measured: .lab/measurements/gateway.json. The default run afterwards
removes the gateway and the fronts.
"""

import json
import time

import pytest

from tests.lab import hosts as lab_hosts

from .conftest import REPO, run_deploy
from .test_security import KEY, _lab2_services

MEASURED = REPO / ".lab" / "measurements" / "gateway.json"
GATEWAY = {"GPUFLEET_LAB_GATEWAY": "lab-2"}
CA = "/tmp/gpufleet-site-ca.crt"
CLIENT = "lab-ubu-1"


def sh(name, command, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


def _fronted(lab, **change):
    sources = [lab["lab-1"]["address"], lab["lab-2"]["address"]]  # the fronts admit the gateway (and lab-1)
    return [
        *_lab2_services(proxy_port=8443, **change),
        "--data",
        "inference_listen=0.0.0.0",
        "--data",
        f"inference_allowed_sources={json.dumps(sources)}",
        "--data",
        "gateway_port=9443",
        "--limit",
        "lab-1,lab-2",
    ]


def _gateway_url(lab, path):
    return f"https://{lab['lab-2']['address']}:9443{path}"


def _probe(url, key=None):
    header = f"-H 'Authorization: Bearer {key}' " if key else ""
    return sh(
        CLIENT, f"curl -s -o /dev/null -m 10 -w '%{{http_code}}' --cacert {CA} {header}{url}; echo \" $?\""
    ).stdout.strip()


def _server_state(server):
    return sh("lab-2", f"/usr/local/lib/gpufleet/gpufleet-gateway-ctl ready chat {server} 0").stdout


@pytest.fixture(scope="module")
def measured():
    results = {}
    yield results
    MEASURED.parent.mkdir(parents=True, exist_ok=True)
    MEASURED.write_text(json.dumps(results, indent=2) + "\n")


@pytest.fixture(scope="module")
def gateway(second_deploy, lab):
    first = run_deploy(*_fronted(lab), env=GATEWAY)
    assert first.rc == 0, first.output[-4000:]
    sh(CLIENT, f"cat > {CA} <<'EOF'\n{(REPO / '.lab' / 'site-tls' / 'ca.crt').read_text()}EOF")
    yield first
    back = run_deploy("--limit", "lab-1,lab-2")
    assert back.rc == 0, back.output[-3000:]
    assert "Stop and disable haproxy.service (no longer in gateway_hosts)" in back.output
    assert sh("lab-2", "systemctl is-active haproxy").stdout.strip() != "active"
    assert (
        sh("lab-2", "ls /etc/gpufleet/secrets").stdout.split() == ["chat.key", "tls.pem"]
        or "gateway" not in sh("lab-2", "ls /etc/gpufleet/secrets").stdout
    )


def test_one_url_for_the_service_with_its_key_and_the_sites_ca(gateway, lab):
    key = KEY.read_text().strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all("(UP" in _server_state(s) for s in ("lab-1", "lab-2")):
        time.sleep(1)
    assert all("(UP" in _server_state(server) for server in ("lab-1", "lab-2"))
    assert _probe(_gateway_url(lab, "/chat/v1/models")) == "401 0"
    assert _probe(_gateway_url(lab, "/chat/v1/models"), key="not-the-key") == "401 0"
    assert _probe(_gateway_url(lab, "/chat/v1/models"), key=key) == "200 0"
    assert _probe(_gateway_url(lab, "/nothing/v1/models"), key=key) == "404 0"
    # the fronts themselves admit the gateway and lab-1 only: the client must go through the gateway
    assert _probe(f"https://{lab['lab-1']['address']}:8443/v1/models", key=key).endswith(" 7")
    streamed = sh(
        CLIENT,
        f"curl -sN -m 30 --cacert {CA} -H 'Authorization: Bearer {key}' {_gateway_url(lab, '/chat/v1/completions')} "
        '-d \'{"prompt": "hello", "max_tokens": 4, "stream": true}\'',
    ).stdout
    assert streamed.count("data: {") >= 2 and streamed.rstrip().endswith("data: [DONE]"), streamed[-500:]
    again = run_deploy(*_fronted(lab), env=GATEWAY)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_a_rolling_restart_under_steady_requests_fails_none(gateway, lab, measured):
    key = KEY.read_text().strip()
    body = '{"prompt": "hello", "max_tokens": 8}'
    sh(CLIENT, "rm -f /tmp/gpufleet-stop /tmp/gpufleet-codes")
    # bounded: at most 1500 requests of at most 30 s each, until the test says stop
    loop = (
        "for i in $(seq 1500); do [ -e /tmp/gpufleet-stop ] && break; "
        f"curl -s -o /dev/null -m 30 -w '%{{http_code}}\\n' --cacert {CA} -H 'Authorization: Bearer {key}' "
        f"{_gateway_url(lab, '/chat/v1/completions')} -d '{body}' >> /tmp/gpufleet-codes; sleep 0.05; done"
    )
    sh(CLIENT, f"nohup sh -c {json.dumps(loop)} >/dev/null 2>&1 &")
    time.sleep(3)
    started = time.monotonic()
    rolled = run_deploy(*_fronted(lab, args=["--ctx-size", "512", "--threads", "1"]), env=GATEWAY)
    seconds = time.monotonic() - started
    time.sleep(3)
    sh(CLIENT, "touch /tmp/gpufleet-stop")
    time.sleep(2)
    codes = sh(CLIENT, "cat /tmp/gpufleet-codes").stdout.split()
    assert rolled.rc == 0, rolled.output[-4000:]
    for name in ("lab-1", "lab-2"):
        assert f"[{name}] gateway lab-2: chat/{name}: drained" in rolled.output, rolled.output[-3000:]
        assert f"[{name}] gateway lab-2: chat/{name}: ready (UP" in rolled.output, rolled.output[-3000:]
    failed = [code for code in codes if code != "200"]
    measured["rolling_restart"] = {
        "hosts": 2,
        "requests": len(codes),
        "failed": len(failed),
        "failed_codes": sorted(set(failed)),
        "deploy_seconds": round(seconds, 1),
    }
    assert len(codes) > 50 and failed == [], measured["rolling_restart"]


def test_a_host_whose_engine_stops_is_out_of_the_pool_within_seconds(gateway, lab, measured):
    key = KEY.read_text().strip()
    sh("lab-1", "systemctl stop gpufleet-chat")
    started = time.monotonic()
    try:
        while time.monotonic() - started < 30 and "(DOWN" not in _server_state("lab-1"):
            time.sleep(0.2)
        out_after = time.monotonic() - started
        codes = [_probe(_gateway_url(lab, "/chat/v1/models"), key=key) for _ in range(5)]
    finally:
        sh("lab-1", "systemctl start gpufleet-chat")
    measured["engine_stopped_out_of_pool_s"] = round(out_after, 1)
    assert "(DOWN" in _server_state("lab-1") or out_after < 30
    assert out_after < 15 and codes == ["200 0"] * 5, (out_after, codes)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "(UP" not in _server_state("lab-1"):
        time.sleep(1)
    assert "(UP" in _server_state("lab-1")
