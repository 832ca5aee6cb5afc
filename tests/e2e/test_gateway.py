"""
The site's gateway on the lab: lab-2 in gateway_hosts (GPUFLEET_LAB_GATEWAY), lab-1 and lab-2 serving
llama.cpp's chat behind their TLS fronts (8443), the gateway on 9443 pooling them. A client on
lab-ubu-1 that trusts the site's CA reaches the service at one URL with its key; a rolling restart of
both hosts under a client's steady requests fails none of them (each host drained at the gateway,
then readmitted once its checks see it up); a host whose engine stops is out of the pool within a few
seconds and the other serves. Measured: .lab/measurements/gateway.json. The default run afterwards
removes the gateway and the fronts.
"""

import subprocess
import sys
import time

import pytest

from tests.lab import hosts as lab_hosts

from .conftest import REPO, measurements, run_deploy
from .test_security import KEY

GATEWAY = {"GPUFLEET_LAB_GATEWAY": "lab-2"}
CA = "/tmp/gpufleet-site-ca.crt"
CLIENT = "lab-ubu-1"
BOTH = ["--limit", "lab-1", "--limit", "lab-2"]


def sh(name, command, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


def _fronted(*more):
    """The lab with its gateway (inventories/lab.py: GPUFLEET_LAB_GATEWAY), lab-1 and lab-2 only."""
    return [*more, *BOTH]


def _gateway_url(lab, path):
    return f"https://{lab['lab-2']['address']}:9443{path}"


def _probe(url, key=None):
    header = f"-H 'Authorization: Bearer {key}' " if key else ""
    return sh(
        CLIENT, f"curl -s -o /dev/null -m 10 -w '%{{http_code}}' --cacert {CA} {header}{url}; echo \" $?\""
    ).stdout.strip()


def _until_lines(count, seconds=30):
    """Whether the client's loop has written ``count`` answers within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(sh(CLIENT, "cat /tmp/gpufleet-codes 2>/dev/null").stdout.split()) >= count:
            return True
        time.sleep(0.5)
    return False


def _server_state(server):
    return sh("lab-2", f"/usr/local/lib/gpufleet/gpufleet-gateway-ctl state chat {server}").stdout


@pytest.fixture(scope="module")
def measured():
    yield from measurements("gateway")


@pytest.fixture(scope="module")
def gateway(second_deploy, lab):
    first = run_deploy(*_fronted(), env=GATEWAY)
    assert first.rc == 0, first.output[-4000:]
    sh(CLIENT, f"cat > {CA} <<'EOF'\n{(REPO / '.lab' / 'site-tls' / 'ca.crt').read_text()}EOF")
    yield first
    back = run_deploy(*BOTH)
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
    # and the gateway admits its clients only (gateway_allowed_sources): lab-net-1 is not one
    other = sh("lab-net-1", f"curl -s -o /dev/null -m 5 -k {_gateway_url(lab, '/chat/v1/models')}; echo $?").stdout
    assert other.strip() == "7", other
    streamed = sh(
        CLIENT,
        f"curl -sN -m 30 --cacert {CA} -H 'Authorization: Bearer {key}' {_gateway_url(lab, '/chat/v1/completions')} "
        '-d \'{"prompt": "hello", "max_tokens": 4, "stream": true}\'',
    ).stdout
    # streamed as events (llama.cpp may join tokens that split a UTF-8 character into one event)
    assert streamed.rstrip().endswith("data: [DONE]") and '"completion_tokens":4' in streamed, streamed[-500:]
    again = run_deploy(*_fronted(), env=GATEWAY)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()
    # the host-by-host checks: the gateway's and the front's must pass on lab-2, none skipped
    checks = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
            "tests/checks/test_gateway.py", "tests/checks/test_inference.py::test_proxies_running_and_refusing_requests_without_the_key",
            "--hosts=ssh://lab-2", f"--ssh-config={lab_hosts.SSH_CONFIG}", "--sudo",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    passed = {line.split("::")[-1].split("[")[0] for line in checks.stdout.splitlines() if line.startswith("PASSED")}
    assert passed == {
        "test_gateway_serves_its_pools_with_tls_and_every_member_up",
        "test_proxies_running_and_refusing_requests_without_the_key",
    }, checks.stdout[-3000:]


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
    sh(CLIENT, f"cat > /tmp/gpufleet-loop.sh <<'EOF'\n{loop}\nEOF")
    sh(CLIENT, "setsid nohup sh /tmp/gpufleet-loop.sh >/dev/null 2>&1 < /dev/null &")
    assert _until_lines(10), "the client's loop does not run"
    started = time.monotonic()
    # a longer start timeout: both hosts' engine units change, so each restarts in its batch
    rolled = run_deploy(*_fronted("--data", "inference_start_timeout=301"), env=GATEWAY)
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
