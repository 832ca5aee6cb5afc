"""The gateway (templates/gpufleet-gateway.cfg.j2) run here with Debian's HAProxy in front of two TLS
fronts (templates/gpufleet-front.cfg.j2), each before an engine stand-in, all with certificates from a
site CA ``site_tls`` made: one URL per service, keys checked at the gateway, a host whose engine stops
taken out by the health checks and clients served by the other, and a drain through HAProxy's
runtime API (templates/gpufleet-gateway-ctl) that waits for the request in flight and sends no new
one there. The pools read from an inventory."""

import base64
import hashlib
import http.client
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest

from operations import TEMPLATES
from operations.core.errors import ConfigError
from operations.gateway import install as gateway
from operations.gateway import pools as gateway_pools
from operations.gateway.facts import HeldOutServers
from operations.rag import front as rag_front
from operations.services import auth_proxy, site_tls
from tests.unit.test_auth_proxy import HAPROXY, _free_port
from tests.unit.test_inference import SERVICE

KEY = "gateway-key"


class Engine(http.server.BaseHTTPRequestHandler):
    """/health and /v1/models answer at once; /slow waits until the test lets it go. Each request is
    recorded with the port of the engine that got it."""

    protocol_version = "HTTP/1.1"
    seen = []
    release = threading.Event()

    def do_GET(self):
        if self.request_version != "HTTP/1.0":  # not a front's own health check (HAProxy's httpchk: HTTP/1.0)
            Engine.seen.append((self.server.server_address[1], self.path))
        if self.path == "/slow":
            Engine.release.wait(30)
        body = json.dumps({"port": self.server.server_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def log_message(self, *args):
        pass


def _start(config_path):
    return subprocess.Popen([HAPROXY, "-db", "-f", str(config_path)], stderr=subprocess.DEVNULL)


def _wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def site(tmp_path):
    """Two fronts (front-1, front-2) before two engines, and a gateway pooling them as service chat."""
    assert os.path.exists(HAPROXY), "HAProxy is not installed: run scripts/bootstrap.sh"
    if os.geteuid() != 0:
        pytest.fail("the gateway test runs HAProxy as root (it drops to haproxy and chroots), as on a host")
    key_file = tmp_path / "keys"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    processes, engines, members = [], [], []
    for name in ("front-1", "front-2"):
        engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Engine)
        threading.Thread(target=engine.serve_forever, daemon=True).start()
        engines.append(engine)
        pem = tmp_path / f"{name}.pem"
        pem.write_bytes(site_tls.host_certificate(tmp_path / "ca", name, ["127.0.0.1", name]))
        port = _free_port()
        service = {**SERVICE, "listen": "127.0.0.1", "proxy_port": port, "port": engine.server_address[1]}
        config = tmp_path / f"{name}.cfg"
        config.write_text(auth_proxy.config_text(service, "65534:65534", str(key_file), str(pem), 1000, 60))
        processes.append(_start(config))
        members.append({"host": name, "address": "127.0.0.1", "port": port})
    pem = tmp_path / "gateway.pem"
    pem.write_bytes(site_tls.host_certificate(tmp_path / "ca", "gateway", ["127.0.0.1", "gateway"]))
    port, admin, metrics = _free_port(), str(tmp_path / "admin.sock"), _free_port()
    pools = {"chat": {"api_key_file": str(key_file), "keys_at": str(key_file), "members": members}}
    ca = str(tmp_path / "ca" / "ca.crt")
    text = gateway.config_text(pools, str(pem), ca, port, "127.0.0.1", 1, 1000, 60, metrics_port=metrics)
    (tmp_path / "gateway.cfg").write_text(text.replace("/run/haproxy/admin.sock", admin))
    processes.append(_start(tmp_path / "gateway.cfg"))
    for member in members:
        _wait_port(member["port"])
    _wait_port(port)
    Engine.seen.clear()
    Engine.release.clear()
    yield {"port": port, "ca": ca, "admin": admin, "engines": engines, "metrics": metrics}
    Engine.release.set()
    for process in processes:
        process.terminate()
        process.wait(10)
    for engine in engines:
        engine.shutdown()


def _get(site, path, key=KEY):
    context = ssl.create_default_context(cafile=site["ca"])
    connection = http.client.HTTPSConnection("127.0.0.1", site["port"], timeout=30, context=context)
    connection.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    answer = connection.getresponse()
    return answer.status, answer.read()


def _post(site, path, body=b'{"prompt": "hello", "max_tokens": 8}'):
    """A keyed POST whose body follows its headers, as an OpenAI client sends a completion."""
    context = ssl.create_default_context(cafile=site["ca"])
    connection = http.client.HTTPSConnection("127.0.0.1", site["port"], timeout=30, context=context)
    connection.putrequest("POST", path)
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders()
    time.sleep(0.05)  # the body in its own TLS record, after the gateway has the headers
    connection.send(body)
    answer = connection.getresponse()
    return answer.status, answer.read()


def _ctl(site, *args):
    return subprocess.run(
        ["python3", str(TEMPLATES / "gpufleet-gateway-ctl"), *args],
        env={**os.environ, "GPUFLEET_HAPROXY_SOCKET": site["admin"]},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _status(site, server):
    return _ctl(site, "state", "chat", server).stdout


def _until(condition, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_one_url_per_service_keys_checked_at_the_gateway_and_both_hosts_used(site):
    assert _until(lambda: "UP" in _status(site, "front-1") and "UP" in _status(site, "front-2"), 20)
    Engine.seen.clear()
    assert _get(site, "/chat/v1/models", key=None)[0] == 401
    assert _get(site, "/chat/v1/models", key="not-the-key")[0] == 401
    assert Engine.seen == []
    ports = {json.loads(_get(site, "/chat/v1/models")[1])["port"] for _ in range(4)}
    assert ports == {engine.server_address[1] for engine in site["engines"]}  # both hosts take requests
    assert {path for _, path in Engine.seen} == {"/v1/models"}  # the service's prefix is the gateway's
    assert _get(site, "/other/v1/models")[0] == 404


def test_a_host_whose_engine_stops_is_taken_out_and_clients_are_served_by_the_other(site):
    assert _until(lambda: "UP" in _status(site, "front-1") and "UP" in _status(site, "front-2"), 20)
    site["engines"][0].shutdown()
    site["engines"][0].server_close()
    started = time.monotonic()
    assert _until(lambda: "DOWN" in _status(site, "front-1"), 20)
    out_after = time.monotonic() - started
    statuses = [_get(site, "/chat/v1/models")[0] for _ in range(6)]
    assert statuses == [200] * 6 and out_after < 10, (statuses, out_after)
    # HAProxy's own metrics say it as gpufleet's GpufleetGatewayMemberDown rule reads it
    metrics = http.client.HTTPConnection("127.0.0.1", site["metrics"], timeout=10)
    metrics.request("GET", "/metrics")
    lines = metrics.getresponse().read().decode().splitlines()
    assert 'haproxy_server_status{proxy="chat",server="front-1",state="DOWN"} 1' in lines
    assert 'haproxy_server_status{proxy="chat",server="front-2",state="UP"} 1' in lines


def test_before_its_health_check_sees_it_a_host_whose_engine_stopped_costs_no_request(site):
    """In the seconds before the gateway's checks take a host out, its front answers 503 (no engine
    behind it): the gateway retries those requests on the other host (retry-on 503), a completion's
    body too (the gateway keeps a small body until it is whole: http-buffer-request)."""
    assert _until(lambda: "UP" in _status(site, "front-1") and "UP" in _status(site, "front-2"), 20)
    site["engines"][0].shutdown()
    site["engines"][0].server_close()
    answers = [_get(site, "/chat/v1/models") for _ in range(3)] + [
        _post(site, "/chat/v1/completions") for _ in range(3)
    ]
    assert [status for status, _ in answers] == [200] * 6, answers
    assert {json.loads(body)["port"] for _, body in answers} == {site["engines"][1].server_address[1]}


def test_a_drained_host_finishes_its_request_in_flight_and_gets_no_new_one(site):
    assert _until(lambda: "UP" in _status(site, "front-1") and "UP" in _status(site, "front-2"), 20)
    in_flight = []
    threading.Thread(target=lambda: in_flight.append(_get(site, "/chat/slow")), daemon=True).start()
    assert _until(lambda: any(path == "/slow" for _, path in Engine.seen), 10)
    busy = next(port for port, path in Engine.seen if path == "/slow")
    server = "front-1" if busy == site["engines"][0].server_address[1] else "front-2"
    draining = subprocess.Popen(
        ["python3", str(TEMPLATES / "gpufleet-gateway-ctl"), "drain", "chat", server, "20"],
        env={**os.environ, "GPUFLEET_HAPROXY_SOCKET": site["admin"]},
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    assert draining.poll() is None  # waits: a request is in flight there
    ports = {json.loads(_get(site, "/chat/v1/models")[1])["port"] for _ in range(4)}
    assert busy not in ports  # new requests go to the other host
    Engine.release.set()
    said, _ = draining.communicate(timeout=30)
    assert draining.returncode == 0 and "drained" in said, said
    assert _until(lambda: in_flight, 10) and in_flight[0][0] == 200
    back = _ctl(site, "ready", "chat", server, "20")
    assert back.returncode == 0 and "ready (UP" in back.stdout, back.stdout


def test_a_server_left_drained_is_told_apart_from_one_whose_check_fails(site):
    """A drain not followed by its ready (a run that stopped) leaves the server out for good, even
    once its check passes, and while its check fails "show stat" says only DOWN: gpufleet reads the
    admin state HAProxy keeps (``held``; the fact deploy.py reads to put such a server back)."""
    assert _until(lambda: "UP" in _status(site, "front-1") and "UP" in _status(site, "front-2"), 20)
    assert _ctl(site, "held").stdout == "" and HeldOutServers().process([]) == {}
    left = _ctl(site, "drain", "chat", "front-1", "5")
    assert left.returncode == 0 and "drained" in left.stdout, left.stdout
    site["engines"][0].shutdown()
    site["engines"][0].server_close()
    assert _until(lambda: "(DOWN" in _status(site, "front-1"), 20)
    assert _status(site, "front-1") == "chat/front-1: (DOWN, 0 in flight); set to drain\n"
    assert _status(site, "front-2") == "chat/front-2: (UP, 0 in flight)\n"
    held = _ctl(site, "held").stdout
    assert held == "chat/front-1 drain\n"
    assert HeldOutServers().process(held.splitlines()) == {"chat/front-1": "drain"}
    # the last server UP of a pool is drained with a warning: the gateway has none left for it
    last = _ctl(site, "drain", "chat", "front-2", "5")
    assert "no other server of chat is UP: this gateway answers 503 for it until one is" in last.stdout, last.stdout
    assert HeldOutServers().process(_ctl(site, "held").stdout.splitlines()) == {
        "chat/front-1": "drain",
        "chat/front-2": "drain",
    }
    assert _ctl(site, "ready", "chat", "front-2", "20").returncode == 0
    assert HeldOutServers().process(_ctl(site, "held").stdout.splitlines()) == {"chat/front-1": "drain"}


def test_a_gateway_whose_haproxy_does_not_run_yet_is_said_and_left(tmp_path):
    """A served host readmitted on a first deploy, before the gateway's HAProxy is installed and
    started, is told so and goes on (the gateway's own start reads its servers as they are)."""
    nowhere = {"admin": str(tmp_path / "admin.sock")}
    for action in ("ready", "drain", "state"):
        said = _ctl(nowhere, action, "chat", "lab-1", "5")
        assert (said.returncode, said.stdout) == (0, "chat/lab-1: HAProxy does not run on this gateway\n"), said
    held = _ctl(nowhere, "held")
    assert (held.returncode, held.stdout) == (0, "HAProxy does not run on this gateway\n"), held
    assert HeldOutServers().process(held.stdout.splitlines()) == {}


def test_pools_are_read_from_the_inventory_and_need_one_set_of_keys(tmp_path):
    one, other = tmp_path / "one", tmp_path / "other"
    one.write_text("k1\nk2\n")
    other.write_text("k3\n")
    chat = {"name": "chat", "proxy_port": 8443, "api_key_file": str(one)}
    hosts = [
        ("gpu-1", {"gpufleet_site_address": "10.0.0.1", "inference_services": [chat]}),
        ("gpu-2", {"ssh_hostname": "gpu-2.example", "inference_services": [chat, {"name": "local", "port": 1}]}),
        ("gw", {"inference_services": []}),
    ]
    assert gateway_pools.pools(hosts) == {
        "chat": {
            "api_key_file": str(one),
            "members": [
                {"host": "gpu-1", "address": "10.0.0.1", "port": 8443},
                {"host": "gpu-2", "address": "gpu-2.example", "port": 8443},
            ],
        }
    }
    assert gateway_pools.key_file_content(str(one)) == b"k1\nk2\n"
    hosts.append(("gpu-3", {"inference_services": [{**chat, "api_key_file": str(other)}]}))
    with pytest.raises(ConfigError, match="gpu-3's api_key_file holds other keys than gpu-1's"):
        gateway_pools.pools(hosts)


def test_a_host_that_left_the_gateway_group_is_recognised_by_its_configuration_and_keys():
    text = gateway.config_text({}, "/p", "/ca", 443, "0.0.0.0", 2, 1000, 60)
    assert text.splitlines()[0] == gateway.MARK + " Edits are overwritten."
    assert "unless" not in text.split("http-request return status 404")[1].splitlines()[0]  # no pool: 404 for all
    found = gateway.GatewayKeyFiles().process(["__config__", "/etc/gpufleet/secrets/gateway-chat.keys"])
    assert found == {"config": True, "keys": ["/etc/gpufleet/secrets/gateway-chat.keys"]}
    assert gateway.GatewayKeyFiles().process([]) == {"config": False, "keys": []}


WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebUI(http.server.BaseHTTPRequestHandler):
    """Open WebUI's stand-in: /health, a page, and a WebSocket upgrade (101, with the accept key RFC 6455
    asks for) after which it echoes one line, as socket.io's transport switches protocols."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.headers.get("Upgrade") == "websocket":
            accept = hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WEBSOCKET_GUID).encode()).digest()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(accept).decode())
            self.end_headers()
            self.wfile.flush()
            self.wfile.write(b"echo " + self.rfile.readline())
            self.wfile.flush()
            self.close_connection = True
            return
        body = json.dumps({"path": self.path, "proto": self.headers.get("X-Forwarded-Proto")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def rag_site(tmp_path):
    """Open WebUI's stand-in behind the RAG host's TLS front (templates/gpufleet-rag-front.cfg.j2),
    served by the gateway on a port of its own."""
    if os.geteuid() != 0:
        pytest.fail("the gateway test runs HAProxy as root (it drops to haproxy and chroots), as on a host")
    webui = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebUI)
    threading.Thread(target=webui.serve_forever, daemon=True).start()
    front_pem = tmp_path / "rag.pem"
    front_pem.write_bytes(site_tls.host_certificate(tmp_path / "ca", "rag-1", ["127.0.0.1", "rag-1"]))
    front_port, gateway_port, rag_port = _free_port(), _free_port(), _free_port()
    (tmp_path / "front.cfg").write_text(
        rag_front.config_text("127.0.0.1", front_port, webui.server_address[1], str(front_pem), "65534:65534", 60)
    )
    gateway_pem = tmp_path / "gateway.pem"
    gateway_pem.write_bytes(site_tls.host_certificate(tmp_path / "ca", "gateway", ["127.0.0.1", "gateway"]))
    ca = str(tmp_path / "ca" / "ca.crt")
    rag = {"host": "rag-1", "address": "127.0.0.1", "port": front_port, "gateway_port": rag_port}
    text = gateway.config_text({}, str(gateway_pem), ca, gateway_port, "127.0.0.1", 1, 1000, 60, rag=rag)
    (tmp_path / "gateway.cfg").write_text(text.replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")))
    processes = [_start(tmp_path / "front.cfg"), _start(tmp_path / "gateway.cfg")]
    for port in (front_port, gateway_port, rag_port):
        _wait_port(port)
    yield {"port": rag_port, "gateway_port": gateway_port, "ca": ca}
    for process in processes:
        process.terminate()
        process.wait(10)
    webui.shutdown()


def _tls(site, port):
    context = ssl.create_default_context(cafile=site["ca"])
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")


def test_open_webui_is_served_on_the_gateways_own_port_through_its_hosts_tls_front(rag_site):
    def page(path):
        connection = http.client.HTTPSConnection(
            "127.0.0.1", rag_site["port"], context=ssl.create_default_context(cafile=rag_site["ca"]), timeout=10
        )
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()

    # the front's health check sees Open WebUI (a server just started is checked before it is used)
    assert _until(lambda: page("/auth")[0] == 200, 10), page("/auth")
    status, body = page("/auth")
    assert json.loads(body) == {"path": "/auth", "proto": "https"}  # no key asked: Open WebUI signs people in
    # the services' port does not lead there
    connection = http.client.HTTPSConnection(
        "127.0.0.1", rag_site["gateway_port"], context=ssl.create_default_context(cafile=rag_site["ca"]), timeout=10
    )
    connection.request("GET", "/auth")
    assert connection.getresponse().status == 404


def test_a_websocket_upgrade_passes_both_hops_and_carries_data_after_it(rag_site):
    assert _until(lambda: _rag_health(rag_site) == 200, 10)
    with _tls(rag_site, rag_site["port"]) as stream:
        stream.sendall(
            b"GET /ws/socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: rag\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        reader = stream.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 101")
        while reader.readline() not in (b"\r\n", b""):
            pass
        stream.sendall(b"2probe\n")
        assert reader.readline() == b"echo 2probe\n"


def _rag_health(site):
    connection = http.client.HTTPSConnection(
        "127.0.0.1", site["port"], context=ssl.create_default_context(cafile=site["ca"]), timeout=10
    )
    connection.request("GET", "/health")
    return connection.getresponse().status


def test_the_gateways_rag_stack_is_one_host_of_rag_hosts_reached_at_its_front():
    served = {"rag_gateway_port": 8444, "rag_front_port": 3443, "gpufleet_site_address": "10.0.0.5"}
    hosts = [("gw", {}, {"gateway_hosts"}), ("gpu-1", served, {"gpu_hosts", "rag_hosts"})]
    assert gateway_pools.rag_stack(hosts, "gw") == {
        "host": "gpu-1",
        "address": "10.0.0.5",
        "port": 3443,
        "gateway_port": 8444,
    }
    # the gateway is the RAG host: its own loopback, where a front listening everywhere answers
    assert gateway_pools.rag_stack(hosts, "gpu-1")["address"] == "127.0.0.1"
    listening_there = [("gpu-1", {**served, "inference_listen": "10.0.0.5"}, {"rag_hosts"})]
    assert gateway_pools.rag_stack(listening_there, "gpu-1")["address"] == "10.0.0.5"
    assert gateway_pools.rag_stack([("gpu-1", {**served, "rag_gateway_port": None}, {"rag_hosts"})], "gw") is None
    with pytest.raises(ConfigError, match="set on gpu-1, gpu-2: the gateway serves one RAG stack"):
        gateway_pools.rag_stack([*hosts, ("gpu-2", served, {"rag_hosts"})], "gw")
