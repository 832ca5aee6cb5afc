"""The authenticating proxy (templates/gpufleet-auth-proxy) run here in front of a small engine
stand-in: requests without the key never reach the engine, the key is not passed on, responses
stream through as the engine writes them. Its unit passes ``systemd-analyze verify``."""

import http.client
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from operations import TEMPLATES
from operations.services import auth_proxy, firewall
from tests.unit.test_inference import SERVICE

KEY = "s3cret-key"


class Engine(http.server.BaseHTTPRequestHandler):
    """Answers /health, echoes what it was sent on /echo, and streams /stream in two pieces, the
    second only after the test has read the first (so a buffering proxy would be caught)."""

    protocol_version = "HTTP/1.1"
    seen = []
    first_piece_read = threading.Event()
    resumed_after_read = []

    def do_GET(self):
        Engine.seen.append((self.path, self.headers.get("Authorization")))
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


@pytest.fixture
def proxy(tmp_path):
    engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o400)
    port = _free_port()
    drop = ["65534:65534"] if os.geteuid() == 0 else []  # as the unit does: read the key as root, then drop
    process = subprocess.Popen(
        [
            sys.executable,
            "-I",
            str(TEMPLATES / "gpufleet-auth-proxy"),
            "127.0.0.1",
            str(port),
            str(engine.server_address[1]),
            str(key_file),
            *drop,
        ],
        stderr=subprocess.PIPE,
    )
    for _ in range(100):  # up to 5 s
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    Engine.seen.clear()
    Engine.proxy_pid = process.pid
    yield port
    process.terminate()
    process.wait(10)
    engine.shutdown()


def _request(port, method, path, key=None, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    connection.request(method, path, body=body, headers=headers)
    return connection, connection.getresponse()


@pytest.mark.parametrize("key", [None, "not-the-key", KEY + "x", KEY[:-1]])
def test_a_request_without_the_key_gets_401_and_never_reaches_the_engine(proxy, key):
    _, answer = _request(proxy, "POST", "/v1/completions", key=key, body=b'{"prompt": "hi"}')
    assert answer.status == 401 and b"unauthorized" in answer.read()
    assert Engine.seen == []


def test_the_key_admits_the_request_and_is_not_passed_on(proxy):
    _, answer = _request(proxy, "POST", "/v1/completions", key=KEY, body=b'{"prompt": "hi"}')
    assert answer.status == 200 and answer.read() == b'{"prompt": "hi"}'
    _, health = _request(proxy, "GET", "/health", key=KEY)
    assert health.status == 200 and health.read() == b'{"status": "ok"}'
    assert Engine.seen == [("/v1/completions", None), ("/health", None)]


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
    unit.write_text(auth_proxy.unit_text(service, "60600:60600", "/etc/gpufleet/secrets/chat.key", 300))
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
    assert (
        "ExecStart=/usr/bin/python3 -I /usr/local/lib/gpufleet/gpufleet-auth-proxy 0.0.0.0 8443 8080 "
        "/etc/gpufleet/secrets/chat.key 60600:60600"
    ) in text


def test_firewall_rules_admit_the_allowed_sources_per_family_and_carry_their_digest():
    text, digest = firewall.rules([8443, 8080, 8080], ["10.0.0.0/8", "192.0.2.7", "fd00::/8"])
    assert f'comment "{digest}"' in text
    assert "elements = { 8080, 8443 }" in text
    assert "elements = { 10.0.0.0/8, 192.0.2.7/32 }" in text and "elements = { fd00::/8 }" in text
    assert "tcp dport @inference_ports ip saddr @allowed_ipv4 accept" in text
    assert text.rstrip().endswith("}") and text.count("reject with tcp reset") == 2
    assert firewall.rules([8080, 8443], ["192.0.2.7", "10.0.0.0/8", "fd00::/8"]) == (text, digest)
    alone, _ = firewall.rules([8080], [])
    assert "accept\n" in alone and "saddr" not in alone and "tcp dport @inference_ports reject" in alone
