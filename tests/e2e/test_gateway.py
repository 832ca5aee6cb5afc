"""
The site's gateway on the lab: lab-2 in gateway_hosts (GPUFLEET_LAB_GATEWAY), lab-1 and lab-2 serving
llama.cpp's chat behind their TLS fronts (8443), the gateway on 9443 pooling them. A client on
lab-ubu-1 that trusts the site's CA reaches the service at one URL with its key; a rolling restart of
both hosts under a client's steady requests fails none of them (each host drained at the gateway,
then readmitted once its checks see it up); a host whose engine stops is out of the pool within a few
seconds and the other serves, a killed engine costs at most the one request it was streaming, and a
revoked key is refused. Measured: .lab/measurements/gateway.json. The default run afterwards removes
the gateway and the fronts.
"""

import time

import pytest

from tests.lab import hosts as lab_hosts

from .conftest import REPO, measurements, run_checks, run_deploy
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
        if len(sh(CLIENT, "cat /tmp/gpufleet-codes 2>/dev/null").stdout.splitlines()) >= count:
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
    checks, outcomes = run_checks(
        [
            "tests/checks/test_gateway.py",
            "tests/checks/test_inference.py::test_proxies_running_and_refusing_requests_without_the_key",
        ],
        ["lab-2"],
    )
    passed = {check for (check, _), outcome in outcomes.items() if outcome == "PASSED"}
    assert passed == {
        "test_gateway_serves_its_pools_with_tls_and_every_member_up",
        "test_proxies_running_and_refusing_requests_without_the_key",
    }, checks.stdout[-3000:]


def _client_loop(lab, key, count):
    """A bounded client on lab-ubu-1: at most ``count`` streamed completions through the gateway, one
    after another, each written as "START-TIME ok|failed HTTP-CODE" (ok: the stream ended with its
    [DONE]), until /tmp/gpufleet-stop exists."""
    body = '{"prompt": "hello", "max_tokens": 8, "stream": true}'
    request = (
        f"curl -sN -m 30 --cacert {CA} -H 'Authorization: Bearer {key}' "
        f"{_gateway_url(lab, '/chat/v1/completions')} -d '{body}'"
    )
    loop = (
        f"for i in $(seq {count}); do [ -e /tmp/gpufleet-stop ] && break; t=$(date +%s.%N); "
        f"o=$({request} -w '\\ncode=%{{http_code}}'); c=${{o##*code=}}; "
        "case \"$o\" in *'data: [DONE]'*) r=ok;; *) r=failed;; esac; "
        'echo "$t $r $c" >> /tmp/gpufleet-codes; sleep 0.05; done'
    )
    sh(CLIENT, "rm -f /tmp/gpufleet-stop /tmp/gpufleet-codes")
    sh(CLIENT, f"cat > /tmp/gpufleet-loop.sh <<'EOF'\n{loop}\nEOF")
    sh(CLIENT, "setsid nohup sh /tmp/gpufleet-loop.sh >/dev/null 2>&1 < /dev/null &")


def _client_results():
    """Stop the client's loop; its requests as ``[(start time, ok, HTTP code)]``."""
    sh(CLIENT, "touch /tmp/gpufleet-stop")
    time.sleep(2)
    lines = sh(CLIENT, "cat /tmp/gpufleet-codes").stdout.splitlines()
    return [(float(at), said == "ok", code) for at, said, code in (line.split() for line in lines)]


def test_a_rolling_restart_under_steady_streams_fails_none(gateway, lab, measured):
    _client_loop(lab, KEY.read_text().strip(), 1500)
    try:
        assert _until_lines(10), "the client's loop does not run"
        started = time.monotonic()
        # a longer start timeout: both hosts' engine units change, so each restarts in its batch
        rolled = run_deploy(*_fronted("--data", "inference_start_timeout=301"), env=GATEWAY)
        seconds = time.monotonic() - started
        time.sleep(3)
    finally:
        requests = _client_results()
    assert rolled.rc == 0, rolled.output[-4000:]
    for name in ("lab-1", "lab-2"):
        assert f"[{name}] gateway lab-2: chat/{name}: drained" in rolled.output, rolled.output[-3000:]
        assert f"[{name}] gateway lab-2: chat/{name}: ready (UP" in rolled.output, rolled.output[-3000:]
    failed = [(at, code) for at, ok, code in requests if not ok]
    measured["rolling_restart"] = {
        "hosts": 2,
        "streamed_requests": len(requests),
        "failed": len(failed),
        "failed_codes": sorted({code for _, code in failed}),
        "deploy_seconds": round(seconds, 1),
    }
    assert len(requests) > 50 and failed == [], measured["rolling_restart"]


def test_a_backend_killed_mid_stream_fails_only_its_request_in_flight(gateway, lab, measured):
    """lab-1's engine container killed while a client streams completions through the gateway, one
    after another: the request in flight at that moment may fail (at most that one: the client has one
    at a time); every request started after it is answered (one that reached lab-1's front while its
    engine was down or loading got 503 there and was retried on lab-2), whether or not the gateway's
    checks saw lab-1 down before systemd brought its engine back; the gateway has it UP again."""
    key = KEY.read_text().strip()
    container = sh("lab-1", "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()
    _client_loop(lab, key, 600)
    try:
        assert _until_lines(10), "the client's loop does not run"
        killed = sh("lab-1", "docker kill gpufleet-chat")
        killed_at, started = time.time(), time.monotonic()
        seen_down = None
        while time.monotonic() - started < 60:
            state = _server_state("lab-1")
            if seen_down is None and "(DOWN" in state:
                seen_down = time.monotonic() - started
            back = sh("lab-1", "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()
            if back and back != container and "(UP" in state and time.monotonic() - started > 10:
                break
            time.sleep(0.2)
        back_after = time.monotonic() - started
        before_back = len(sh(CLIENT, "cat /tmp/gpufleet-codes").stdout.splitlines())
        assert _until_lines(before_back + 20), "the client's loop stopped"
    finally:
        requests = _client_results()
    failed = [(at, code) for at, ok, code in requests if not ok]
    after_kill = [at for at, _ in failed if at > killed_at]
    measured["engine_killed"] = {
        "requests": len(requests),
        "failed": len(failed),
        "failed_codes": sorted({code for _, code in failed}),
        "failed_started_after_the_kill": len(after_kill),
        "seen_down_at_the_gateway_s": seen_down and round(seen_down, 1),
        "engine_back_and_up_s": round(back_after, 1),
    }
    assert killed.returncode == 0, killed.stderr
    assert back and back != container and "(UP" in _server_state("lab-1"), measured["engine_killed"]
    assert len(requests) > 40 and len(failed) <= 1 and after_kill == [], measured["engine_killed"]
    assert seen_down is None or seen_down < 15, measured["engine_killed"]


def test_a_key_added_is_taken_and_once_revoked_refused_at_the_gateway(gateway, lab):
    """Key rotation through the gateway: a second key written to the service's key file is admitted
    once deployed (at the gateway and at both fronts); the old one, once removed and deployed, gets
    401 from the gateway while the new one is served."""
    from .test_security import _lab2_services

    key = KEY.read_text().strip()
    rotated = REPO / ".lab" / "secrets" / "chat-api-key-gateway"
    rotated.write_text(f"{key}\nnext-{key}\n")
    rotated.chmod(0o600)
    with_file = _fronted(*_lab2_services(proxy_port=8443, api_key_file=str(rotated)))
    both = run_deploy(*with_file, env=GATEWAY)
    assert both.rc == 0, both.output[-3000:]
    url = _gateway_url(lab, "/chat/v1/models")
    assert (_probe(url, key=key), _probe(url, key=f"next-{key}")) == ("200 0", "200 0")
    rotated.write_text(f"next-{key}\n")
    revoked = run_deploy(*with_file, env=GATEWAY)
    assert revoked.rc == 0, revoked.output[-3000:]
    assert (_probe(url, key=key), _probe(url, key=f"next-{key}")) == ("401 0", "200 0")
