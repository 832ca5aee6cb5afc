"""Read as an attacker with an ordinary login on a lab host (the lab user ``nosudo``: no sudo, not in
the docker group) and as another host of the network: no secret is readable, no service answers
from elsewhere, a request without the key is refused."""

import json
import shlex
import subprocess

import pytest

from tests.lab import hosts as lab_hosts

from .conftest import REPO, run_checks, run_deploy

KEY = REPO / ".lab" / "secrets" / "chat-api-key"
HOSTS = ["lab-1", "lab-gap-1"]


def as_user(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False, user=lab_hosts.NO_SUDO_USER)


def as_root(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False)


@pytest.mark.parametrize("name", HOSTS)
def test_an_ordinary_login_reads_no_secret_file(second_deploy, name):
    listing = as_user(name, "id -Gn; ls /etc/gpufleet/secrets; cat /etc/gpufleet/secrets/chat.key")
    assert "docker" not in listing.stdout.split("\n")[0].split()
    assert "Permission denied" in listing.stderr and KEY.read_text().strip() not in listing.stdout


@pytest.mark.parametrize("name", HOSTS)
def test_an_ordinary_login_cannot_read_the_services_environment_or_ask_docker(second_deploy, name):
    pid = as_root(
        name,
        'for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = llama-server ] && echo ${p#/proc/} && break; done',
    ).stdout.strip()
    assert pid, "the llama.cpp service is not running"
    environ = as_user(name, f"cat /proc/{pid}/environ")
    assert environ.returncode != 0 and "Permission denied" in environ.stderr
    inspect = as_user(name, "docker inspect gpufleet-chat")
    assert inspect.returncode != 0 and "permission denied" in inspect.stderr.lower()
    # The container runs as the service's own account, not the login's and not root.
    owner = as_user(name, f"stat -c %U /proc/{pid}").stdout.strip()
    assert owner == "gpufleet-chat"


@pytest.mark.parametrize("name", HOSTS)
def test_no_process_environment_holds_the_key(second_deploy, name):
    """llama.cpp reads its key from its file: no process on the host has it in its environment."""
    key = KEY.read_text().strip()
    counted = lab_hosts.ssh(
        {"name": name},
        "umask 077; p=$(mktemp); cat > $p; n=0; "
        "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f 2>/dev/null "
        "| grep -F -q -f $p && n=$((n+1)); done; echo $n; rm -f $p",
        check=False,
        input=key + "\n",
    )
    assert counted.stdout.strip() == "0", counted.stderr


@pytest.mark.parametrize("name", HOSTS)
def test_a_request_without_the_key_is_refused(second_deploy, name):
    answer = as_user(name, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/v1/models")
    assert answer.stdout == "401"
    wrong = as_user(
        name,
        "curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer not-the-key' http://127.0.0.1:8080/v1/models",
    )
    assert wrong.stdout == "401"


def test_no_service_port_answers_from_another_host(second_deploy, lab):
    """Every service port of lab-1 (from its host.json), probed from lab-2: nothing connects."""
    record = json.loads(as_root("lab-1", "cat /etc/gpufleet/host.json").stdout)
    address = lab["lab-1"]["address"]
    for service in record["services"]:
        probe = as_root("lab-2", f"curl -s -o /dev/null -m 5 http://{address}:{service['port']}/; echo $?")
        assert probe.stdout.strip() == "7", (service["name"], probe.stdout)  # 7: could not connect


def _lab2_services(**change):
    from tests.lab.llamacpp import image_tag

    service = {
        "name": "chat",
        "engine": "llamacpp",
        "image": image_tag(),
        "model": "tiny/tiny.gguf",
        "port": 8080,
        "memory": "1g",
        "args": ["--ctx-size", "256", "--threads", "1"],
        "api_key_file": str(KEY),
        **change,
    }
    return ["--data", f"inference_services={json.dumps([service])}"]


def _probe(source, url, key=None, data=None, ca=None):
    """curl from ``source`` (as root): the HTTP code, or curl's exit code when nothing answered."""
    header = f"-H 'Authorization: Bearer {key}' " if key else ""
    body = f"-d '{data}' " if data else ""
    trust = f"--cacert {ca} " if ca else ""
    return as_root(
        source, f"curl -s -o /dev/null -m 5 -w '%{{http_code}}' {trust}{header}{body}{url}; echo \" $?\""
    ).stdout.strip()


# A request in flight across a reload: its body trickles in (a space every 0.2 s before the JSON) until
# /tmp/gpufleet-go exists on the client, then the rest goes at once; prints the answer's status line.
SLOW_CLIENT = r"""
import os, socket, ssl, sys, time
ca, host, port, key = sys.argv[1:5]
body = b'{"prompt": "hello", "max_tokens": 4}'
body = b" " * (2000 - len(body)) + body
context = ssl.create_default_context(cafile=ca)
with context.wrap_socket(socket.create_connection((host, int(port)), timeout=120), server_hostname=host) as tls:
    tls.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    sent = 0
    while sent < len(body) - 100 and not os.path.exists("/tmp/gpufleet-go"):
        tls.sendall(body[sent:sent + 1]); sent += 1; time.sleep(0.2)
    tls.sendall(body[sent:])
    print(f"trickled {sent} bytes", tls.recv(200).split(b"\r\n")[0].decode())
"""


def _rotating_a_key_reloads_the_front_and_drops_no_request(exposed, proxy, ca, key):
    """A second key added to the service's key file: the deploy reloads the front (same master process),
    a request whose body is still arriving across the reload is answered, and both keys are admitted;
    with the old key removed, only the new one is."""
    rotated = REPO / ".lab" / "secrets" / "chat-api-key-rotated"
    rotated.write_text(f"{key}\nnext-{key}\n")
    rotated.chmod(0o600)
    with_both = [*_lab2_services(proxy_port=8090, api_key_file=str(rotated)), *exposed[2:]]
    master = as_root("lab-2", "systemctl show -p MainPID --value gpufleet-chat-proxy").stdout.strip()
    as_root("lab-1", "rm -f /tmp/gpufleet-go")
    address = proxy.split("//")[1].split(":")[0]
    in_flight = subprocess.Popen(
        ["ssh", "-F", str(lab_hosts.SSH_CONFIG), "-o", "BatchMode=yes", "lab-1",
         f"python3 -c {shlex.quote(SLOW_CLIENT)} {ca} {address} 8090 {shlex.quote(key)}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        reloaded = run_deploy("--limit", "lab-2", *with_both)
        still_sending = in_flight.poll() is None
    finally:
        as_root("lab-1", "touch /tmp/gpufleet-go")
    answer, errors = in_flight.communicate(timeout=120)
    assert reloaded.rc == 0, reloaded.output[-3000:]
    assert "Reload gpufleet-chat-proxy.service after its configuration, keys or certificate changed" in reloaded.output
    assert still_sending and answer.split()[-3:] == ["HTTP/1.1", "200", "OK"], (answer, errors)
    assert as_root("lab-2", "systemctl show -p MainPID --value gpufleet-chat-proxy").stdout.strip() == master
    assert _probe("lab-1", f"{proxy}/v1/models", key=f"next-{key}", ca=ca) == "200 0"
    assert _probe("lab-1", f"{proxy}/v1/models", key=key, ca=ca) == "200 0"
    rotated.write_text(f"next-{key}\n")
    retired = run_deploy("--limit", "lab-2", *with_both)
    assert retired.rc == 0, retired.output[-3000:]
    assert _probe("lab-1", f"{proxy}/v1/models", key=key, ca=ca) == "401 0"
    assert _probe("lab-1", f"{proxy}/v1/models", key=f"next-{key}", ca=ca) == "200 0"


def test_behind_its_proxy_a_service_answers_the_key_from_allowed_sources_only(second_deploy, lab):
    """lab-2's llama.cpp behind gpufleet's authenticating proxy on 0.0.0.0:8090, the firewall admitting
    lab-1 only: from lab-1 the proxy wants the key and then serves (streaming too), the engine itself
    is on loopback; from lab-ubu-1 (not allowed) the same port is refused; a re-run changes nothing;
    the default inventory afterwards removes the proxy and its port."""
    key, target = KEY.read_text().strip(), lab["lab-2"]["address"]
    exposed = [
        *_lab2_services(proxy_port=8090),
        "--data",
        "inference_listen=0.0.0.0",
        "--data",
        f"inference_allowed_sources={json.dumps([lab['lab-1']['address']])}",
    ]
    try:
        first = run_deploy("--limit", "lab-2", *exposed)
        assert first.rc == 0, first.output[-3000:]
        # lab-1 trusts the site's CA (the one the control node keeps) and reaches lab-2 by its address
        ca = "/tmp/gpufleet-site-ca.crt"
        site_ca = (REPO / ".lab" / "site-tls" / "ca.crt").read_text()
        as_root("lab-1", f"cat > {ca} <<'EOF'\n{site_ca}EOF")
        proxy = f"https://{target}:8090"
        assert _probe("lab-1", f"{proxy}/v1/models", ca=ca) == "401 0"
        assert _probe("lab-1", f"{proxy}/v1/models", key="not-the-key", ca=ca) == "401 0"
        assert _probe("lab-1", f"{proxy}/v1/models", key=key, ca=ca) == "200 0"
        assert _probe("lab-1", f"{proxy}/v1/models", key=key).endswith(" 60")  # no trust in the site CA: refused
        assert _probe("lab-1", f"http://{target}:8090/v1/models", key=key).split()[0] in ("000", "400")  # TLS only
        streamed = as_root(
            "lab-1",
            f"curl -sN -m 30 --cacert {ca} -H 'Authorization: Bearer {key}' {proxy}/v1/completions "
            '-d \'{"prompt": "hello", "max_tokens": 4, "stream": true}\'',
        ).stdout
        # streamed as events (llama.cpp may join tokens that split a UTF-8 character into one event)
        assert streamed.rstrip().endswith("data: [DONE]"), streamed[-500:]
        assert '"completion_tokens":4' in streamed
        assert _probe("lab-1", f"http://{target}:8080/health").endswith(" 7")  # the engine: loopback only
        assert _probe("lab-ubu-1", f"{proxy}/health").endswith(" 7")  # not an allowed source: reset
        # HAProxy's master stays root (it reads the root-only key and certificate and binds), its
        # worker serves as the service's account; the engine has no key.
        front = "pid=$(systemctl show -p MainPID --value gpufleet-chat-proxy); ps -o user:32= -p $pid --ppid $pid"
        assert sorted(as_root("lab-2", front).stdout.split()) == ["gpufleet-chat", "root"]
        assert as_root("lab-2", "stat -c '%a %U' /etc/gpufleet/secrets/tls.pem").stdout.strip() == "600 root"
        assert as_root("lab-2", "stat -c '%a %U' /etc/gpufleet/secrets/chat.key").stdout.strip() == "400 root"
        assert "--api-key-file" not in as_root("lab-2", "cat /etc/systemd/system/gpufleet-chat.service").stdout
        record = json.loads(as_root("lab-2", "cat /etc/gpufleet/host.json").stdout)
        assert record["services"][0]["proxy"]["port"] == 8090 and record["allowed_sources"] == [lab["lab-1"]["address"]]
        # the host-by-host checks see the proxy and the firewall too (their proxy check runs here)
        checks, _ = run_checks(["tests/checks/test_inference.py"], ["lab-2"])
        assert checks.returncode == 0 and " failed" not in checks.stdout, checks.stdout[-3000:]
        assert "skipped" not in checks.stdout, checks.stdout[-3000:]
        again = run_deploy("--limit", "lab-2", *exposed)
        assert again.rc == 0 and again.total_changed() == 0, again.changed()
        _rotating_a_key_reloads_the_front_and_drops_no_request(exposed, proxy, ca, key)
    finally:
        back = run_deploy("--limit", "lab-2")
    assert back.rc == 0, back.output[-3000:]
    assert "Stop and disable gpufleet-chat-proxy.service (no longer in inference_services)" in back.output
    assert as_root("lab-2", "test -e /etc/systemd/system/gpufleet-chat-proxy.service").returncode == 1
    assert _probe("lab-1", f"https://{target}:8090/health").endswith(" 7")
    assert as_root("lab-2", "test -e /etc/gpufleet/proxy/chat.cfg").returncode == 1
    assert _probe("lab-2", "http://127.0.0.1:8080/v1/models", key=key) == "200 0"


def test_the_loaded_firewall_is_the_deploys_and_comes_back_after_a_flush(second_deploy):
    """The table carries the digest of the file it came from; flushed by hand, the next run reloads it."""
    rules = as_root("lab-1", "cat /etc/gpufleet/firewall.nft").stdout
    loaded = as_root("lab-1", "nft list table inet gpufleet").stdout
    digest = next(line.split('"')[1] for line in rules.splitlines() if line.strip().startswith("comment"))
    assert f'comment "{digest}"' in loaded and "elements = { 8080 }" in loaded
    assert as_root("lab-1", "nft -c -f /etc/gpufleet/firewall.nft").returncode == 0
    as_root("lab-1", "nft delete table inet gpufleet")
    repaired = run_deploy("--limit", "lab-1")
    assert repaired.rc == 0, repaired.output[-3000:]
    assert list(repaired.changed()) == [
        "GPU host | Deploy inference services | Admit inference ports only from the "
        "allowed sources | Load the rules (gpufleet-firewall.service) after they "
        "changed, or when the loaded table is not theirs"
    ], repaired.changed()
    assert f'comment "{digest}"' in as_root("lab-1", "nft list table inet gpufleet").stdout


def test_a_bridge_service_refuses_a_lan_host_routing_to_its_container_and_outlives_nftables(second_deploy, lab):
    """lab-2's llama.cpp on a bridge network, published on 0.0.0.0:8080, lab-1 allowed: a LAN host with a
    route to the container's address (no DNAT) is refused by where the packet goes, lab-1 is admitted
    the same way; nftables.service started (its stock file flushes the whole ruleset) and reloaded on
    the host, gpufleet's table is loaded again each time."""
    target, key, container = lab["lab-2"]["address"], KEY.read_text().strip(), None
    bridged = [
        *_lab2_services(network="bridge"),
        "--data",
        "inference_listen=0.0.0.0",
        "--data",
        f"inference_allowed_sources={json.dumps([lab['lab-1']['address']])}",
    ]
    try:
        first = run_deploy("--limit", "lab-2", *bridged)
        assert first.rc == 0, first.output[-3000:]
        container = as_root("lab-2", "docker inspect -f '{{.NetworkSettings.IPAddress}}' gpufleet-chat").stdout.strip()
        assert container, "the service has no bridge address"
        for source in ("lab-1", "lab-ubu-1"):  # a route to the container through lab-2, as a LAN router gives
            assert as_root(source, f"ip route replace {container}/32 via {target}").returncode == 0
        direct = f"http://{container}:8080/health"
        assert _probe("lab-ubu-1", direct).endswith(" 7")  # reset: not an allowed source
        assert _probe("lab-ubu-1", f"http://{target}:8080/health").endswith(" 7")  # and through the published port
        assert _probe("lab-1", direct, key=key) == "200 0"
        assert _probe("lab-1", f"http://{target}:8080/health", key=key) == "200 0"
        digest = as_root("lab-2", "nft list table inet gpufleet | grep comment").stdout.strip()
        for action in ("restart", "reload"):
            assert as_root("lab-2", f"systemctl {action} nftables").returncode == 0, action
            assert as_root("lab-2", "nft list table inet gpufleet | grep comment").stdout.strip() == digest, action
            assert _probe("lab-ubu-1", direct).endswith(" 7"), action
    finally:
        for source in ("lab-1", "lab-ubu-1"):
            if container:
                as_root(source, f"ip route del {container}/32")
        # stopping nftables.service flushes every table (Docker's iptables-nft rules too): put both back
        as_root("lab-2", "systemctl stop nftables; systemctl start gpufleet-firewall; systemctl restart docker")
        back = run_deploy("--limit", "lab-2")
    assert back.rc == 0, back.output[-3000:]


def test_beyond_loopback_without_allowed_sources_is_refused_before_any_host(second_deploy):
    result = run_deploy("--limit", "lab-2", "--data", "inference_listen=0.0.0.0")
    assert result.rc != 0
    assert (
        "lab-2: inference_listen: 0.0.0.0: service chat listens beyond this host, but inference_allowed_sources "
        "is empty"
    ) in result.output, result.output[-2000:]
    assert "Starting operation" not in result.output
