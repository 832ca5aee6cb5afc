"""The authenticating TLS front (HAProxy with templates/gpufleet-front.cfg.j2) run here, with a
certificate from a site CA made by ``site_tls``, in front of a small engine stand-in: requests
without a key never reach the engine, any key of the file admits them and is not passed on, bodies
over the limit or without a length are refused unread, responses stream through as the engine
writes them. Its unit passes ``systemd-analyze verify``."""

import http.client
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from operations.services import auth_proxy, site_tls
from tests.unit.test_inference import SERVICE

KEY, OTHER_KEY = "s3cret-key", "next-key"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class Engine(http.server.BaseHTTPRequestHandler):
    """Answers /health, echoes what it was sent on /echo, and streams /stream in two pieces, the
    second only after the test has read the first (so a buffering proxy would be caught)."""

    protocol_version = "HTTP/1.1"
    seen = []
    first_piece_read = threading.Event()
    resumed_after_read = []
    upstream_closed = []

    def do_GET(self):
        if self.request_version != "HTTP/1.0":  # not the front's own health check (HAProxy's httpchk: HTTP/1.0)
            Engine.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/hold":  # answers nothing; says whether the proxy closed this connection within 10 s
            self.connection.settimeout(10)
            try:
                Engine.upstream_closed.append(self.connection.recv(1) == b"")
            except ConnectionResetError:  # closed with a reset
                Engine.upstream_closed.append(True)
            except TimeoutError:
                Engine.upstream_closed.append(False)
            self.close_connection = True
            return
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece, wait in ((b"data: one\n\n", True), (b"data: two\n\n", False)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                if wait:
                    Engine.resumed_after_read.append(Engine.first_piece_read.wait(10))
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Engine.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site CA and this machine's certificate from it, as a deploy makes them."""
    directory = tmp_path_factory.mktemp("site-tls")
    pem = directory / "host.pem"
    pem.write_bytes(site_tls.host_certificate(directory, "front", ["127.0.0.1", "front.example"]))
    pem.chmod(0o600)
    return {"ca": str(directory / "ca.crt"), "pem": str(pem)}


@pytest.fixture
def proxy(tmp_path, site, request):
    """The front on a free port; ``request.param`` (indirect), when given, is its monitoring hosts."""
    # scripts/bootstrap.sh installs Debian's HAProxy here: the test fails, never skips, without it
    assert os.path.exists(HAPROXY), "HAProxy is not installed: run scripts/bootstrap.sh"
    engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n{OTHER_KEY}\n")
    key_file.chmod(0o400)
    port = _free_port()
    service = {**SERVICE, "listen": "127.0.0.1", "proxy_port": port, "port": engine.server_address[1]}
    # as the unit does: read the key and certificate as root, then serve as another account
    account = "65534:65534" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    watchers = getattr(request, "param", ())
    config = auth_proxy.config_text(service, account, str(key_file), site["pem"], 1000, 60, metrics_sources=watchers)
    if os.geteuid() != 0:
        config = config.replace("    chroot /var/lib/haproxy\n", "")
    (tmp_path / "front.cfg").write_text(config)
    process = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "front.cfg")], stderr=subprocess.PIPE)
    for _ in range(100):  # up to 5 s
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    Engine.seen.clear()
    Engine.proxy_pid = process.pid
    yield {"port": port, "ca": site["ca"]}
    process.terminate()
    process.wait(10)
    engine.shutdown()


def _request(proxy, method, path, key=None, body=None, headers=None):
    context = ssl.create_default_context(cafile=proxy["ca"])
    connection = http.client.HTTPSConnection("127.0.0.1", proxy["port"], timeout=10, context=context)
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    connection.request(method, path, body=body, headers=headers)
    return connection, connection.getresponse()


@pytest.mark.parametrize("key", [None, "not-the-key", KEY + "x", KEY[:-1], f"{KEY} {OTHER_KEY}"])
def test_a_request_without_a_key_gets_401_and_never_reaches_the_engine(proxy, key):
    _, answer = _request(proxy, "POST", "/v1/completions", key=key, body=b'{"prompt": "hi"}')
    assert answer.status == 401 and b"unauthorized" in answer.read()
    assert answer.getheader("WWW-Authenticate") == 'Bearer realm="gpufleet"'
    assert Engine.seen == []


def test_an_http2_client_without_a_key_reads_its_401_not_a_reset_stream(proxy):
    """HAProxy 2.6 answering before a request's body arrived resets the HTTP/2 stream (CANCEL), which
    curl reports as error 92 instead of the answer: the front lets a small body in first."""
    codes = subprocess.run(
        "for i in $(seq 20); do curl -sS --http2 -m 10 -o /dev/null -w '%{http_code} ' "
        f"--cacert {proxy['ca']} https://127.0.0.1:{proxy['port']}/invocations -d '{{\"a\": 1}}' 2>&1; done",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert codes.split() == ["401"] * 20, codes
    assert Engine.seen == []


@pytest.mark.parametrize("proxy", [["192.0.2.9", "127.0.0.1"]], indirect=True)
def test_the_monitoring_hosts_read_the_engines_metrics_without_a_key_and_nothing_else(proxy):
    _, metrics = _request(proxy, "GET", "/metrics")
    assert metrics.status == 200
    _, models = _request(proxy, "GET", "/v1/models")
    assert models.status == 401
    _, beyond = _request(proxy, "GET", "/metrics/../v1/models")
    assert beyond.status == 401
    assert Engine.seen == [("/metrics", None)]


@pytest.mark.parametrize("proxy", [["192.0.2.9"]], indirect=True)
def test_metrics_asked_from_any_other_address_need_the_key(proxy):
    _, metrics = _request(proxy, "GET", "/metrics")
    assert metrics.status == 401
    _, keyed = _request(proxy, "GET", "/metrics", key=KEY)
    assert keyed.status == 200
    assert Engine.seen == [("/metrics", None)]


def test_each_key_of_the_file_admits_the_request_and_is_not_passed_on(proxy):
    _, answer = _request(proxy, "POST", "/v1/completions", key=KEY, body=b'{"prompt": "hi"}')
    assert answer.status == 200 and answer.read() == b'{"prompt": "hi"}'
    _, health = _request(proxy, "GET", "/health", key=OTHER_KEY)  # the second key: a rotation's new one
    assert health.status == 200 and health.read() == b'{"status": "ok"}'
    assert Engine.seen == [("/v1/completions", None), ("/health", None)]


def test_a_body_over_the_limit_or_without_a_length_is_refused_unread(proxy):
    _, big = _request(proxy, "POST", "/v1/completions", key=KEY, body=b"x" * 1001)
    assert big.status == 413 and b"inference_max_request_bytes" in big.read()
    _, fits = _request(proxy, "POST", "/v1/completions", key=KEY, body=b"x" * 1000)
    assert fits.status == 200 and fits.read() == b"x" * 1000
    # a chunked body, sent with its headers in one piece (HAProxy answers and closes without reading it)
    context = ssl.create_default_context(cafile=proxy["ca"])
    connection = socket.create_connection(("127.0.0.1", proxy["port"]), timeout=10)
    with context.wrap_socket(connection, server_hostname="127.0.0.1") as raw:
        raw.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Transfer-Encoding: chunked\r\n\r\na\r\nxxxxxxxxxx\r\n0\r\n\r\n".encode()
        )
        assert raw.recv(100).startswith(b"HTTP/1.1 411 ")
    assert Engine.seen == [("/v1/completions", None)]


def test_a_client_that_goes_away_closes_its_request_at_the_engine(proxy):
    Engine.upstream_closed.clear()
    context = ssl.create_default_context(cafile=proxy["ca"])
    connection = socket.create_connection(("127.0.0.1", proxy["port"]), timeout=10)
    with context.wrap_socket(connection, server_hostname="127.0.0.1") as raw:
        raw.sendall(f"GET /hold HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
        for _ in range(100):  # until the engine has the request (at most 5 s)
            if ("/hold", None) in Engine.seen:
                break
            time.sleep(0.05)
    # the client is gone: the front closes the engine's connection (option abortonclose)
    for _ in range(200):
        if Engine.upstream_closed:
            break
        time.sleep(0.05)
    assert Engine.upstream_closed == [True]


def test_it_speaks_tls_only_with_the_sites_certificate(proxy):
    plain = http.client.HTTPConnection("127.0.0.1", proxy["port"], timeout=5)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
        plain.request("GET", "/health")
        plain.getresponse()
    with pytest.raises(ssl.SSLCertVerificationError):  # not a CA the system trusts
        http.client.HTTPSConnection("127.0.0.1", proxy["port"], timeout=5).request("GET", "/health")
    assert Engine.seen == []


def test_a_streamed_answer_passes_each_piece_as_the_engine_writes_it(proxy):
    Engine.first_piece_read.clear()
    Engine.resumed_after_read.clear()
    _, answer = _request(proxy, "GET", "/stream", key=KEY)
    assert answer.status == 200 and answer.getheader("Content-Type") == "text/event-stream"
    assert answer.readline() == b"data: one\n"
    Engine.first_piece_read.set()  # the engine writes its second piece only now
    assert answer.read() == b"\ndata: two\n\n"
    assert Engine.resumed_after_read == [True]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another account needs root")
def test_started_as_root_it_serves_as_the_account_it_was_given(proxy):
    ids = [line.split()[1:] for line in open(f"/proc/{Engine.proxy_pid}/status") if line.startswith(("Uid:", "Gid:"))]
    assert ids == [["65534"] * 4, ["65534"] * 4]  # real, effective, saved and filesystem ids
    _, answer = _request(proxy, "GET", "/health", key=KEY)  # the key was read before the drop
    assert answer.status == 200


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed here")
def test_the_proxy_unit_verifies(tmp_path):
    service = {**SERVICE, "listen": "0.0.0.0", "proxy_port": 8443, "api_key_file": "/k"}
    unit = tmp_path / "gpufleet-chat-proxy.service"
    unit.write_text(
        auth_proxy.unit_text(
            service,
            "60600:60600",
            "/etc/gpufleet/secrets/chat.key",
            "/etc/gpufleet/site-ca.crt",
            "/etc/gpufleet/proxy/chat.cfg",
            300,
        )
    )
    checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    # gpufleet's tools are not installed on this machine: that is the only complaint allowed
    complaints = [
        line
        for line in checked.stderr.splitlines()
        if "gpufleet-chat-proxy.service" in line
        and "/usr/local/lib/gpufleet/gpufleet-wait-ready is not executable" not in line
    ]
    assert complaints == [], checked.stderr
    text = unit.read_text()
    assert "ExecStart=/usr/sbin/haproxy -Ws -f /etc/gpufleet/proxy/chat.cfg\n" in text
    assert (
        "ExecStartPost=/usr/local/lib/gpufleet/gpufleet-wait-ready 300 https://127.0.0.1:8443/health https://127.0.0.1:8443/v1/models\n"
        in text
    )
    assert "ExecReload=/bin/kill -USR2 $MAINPID\n" in text and "GPUFLEET_CA_FILE=/etc/gpufleet/site-ca.crt" in text


def test_the_front_configuration_is_valid_for_haproxy_and_binds_the_services_address(tmp_path, site):
    assert os.path.exists(HAPROXY), "HAProxy is not installed: run scripts/bootstrap.sh"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    service = {**SERVICE, "listen": "0.0.0.0", "proxy_port": 8443}
    text = auth_proxy.config_text(service, "60600:60600", str(key_file), site["pem"], max_bytes=33554432, timeout=900)
    (tmp_path / "front.cfg").write_text(text)
    checked = subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "front.cfg")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"bind 0.0.0.0:8443 ssl crt {site['pem']} alpn h2,http/1.1" in text
    assert "server engine 127.0.0.1:8080" in text and "uid 60600\n    gid 60600" in text
    assert "gt 33554432" in text and "timeout server 900s" in text


def test_a_keyed_request_whose_body_arrives_slowly_is_passed_on_not_held(proxy):
    """The wait for a body before an early refusal is for refused requests only: a keyed upload whose
    body pauses past that wait (3 s) reaches the engine whole."""
    context = ssl.create_default_context(cafile=proxy["ca"])
    connection = socket.create_connection(("127.0.0.1", proxy["port"]), timeout=20)
    with context.wrap_socket(connection, server_hostname="127.0.0.1") as raw:
        raw.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Length: 20\r\n\r\n0123456789".encode()
        )
        time.sleep(3)
        raw.sendall(b"abcdefghij")
        answer = b""
        while not answer.endswith(b"0123456789abcdefghij"):
            piece = raw.recv(1000)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"0123456789abcdefghij"), answer
