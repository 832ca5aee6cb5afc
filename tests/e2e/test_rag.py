"""
The RAG stack on the lab: lab-gap-1 (air-gapped: no route out; a sudo login; everything from the
bundle) in rag_hosts (GPUFLEET_LAB_RAG) and its own gateway, with
Open WebUI and Chroma's server (the lab's images of PyPI's open-webui 0.12.4 and chromadb 1.5.9), chat
and embeddings from two llama.cpp services of Gemma 3 270M. The units start in health order, Open
WebUI answers on loopback, and beyond the host only through the gateway's port (TLS with the site's
certificate, through the stack's TLS front); its secrets are in no unit and no ``docker inspect``,
sign-up is off and the admin gpufleet created signs in; a document uploaded through Open WebUI's API is embedded
through the fleet, stored in Chroma and answers a question whose answer only it holds; in a real
browser (Debian's chromium through its chromium-driver, driven by Selenium), at the gateway's URL,
the admin signs in,
uploads the document, asks and sees the answer (screenshot: .lab/artifacts/rag-chat.png). A second
run changes nothing; a run without the stack removes its units, its front and the gateway, and keeps
its data. Measured:
.lab/measurements/rag.json.
"""

import base64
import hashlib
import json
import shlex
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.lab import hosts as lab_hosts

from .conftest import REPO, measurements, run_checks, run_deploy, until

HOST = "lab-gap-1"
WITH_STACK = {"GPUFLEET_LAB_RAG": HOST}
EMAIL = "admin@lab.test"
PASSWORD_FILE = REPO / ".lab" / "secrets" / "rag-admin-password"  # made when the lab comes up
WEBUI = "http://127.0.0.1:3000"
UNITS = ["gpufleet-rag-vectordb", "gpufleet-rag-chat", "gpufleet-rag-embed", "gpufleet-rag-webui"]
DOCUMENT = "Lab notes, December 2026.\nThe lab vault code is PAPAYA-4417.\nThe vault is opened only on Tuesdays.\n"
QUESTION = "What is the lab vault code?"
ANSWER = "PAPAYA-4417"
ARTIFACTS = REPO / ".lab" / "artifacts"
CA = REPO / ".lab" / "site-tls" / "ca.crt"


def sh(command, name=HOST, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


def api(method, path, token=None, body=None, form_file=None, timeout=120):
    """Open WebUI's answer (status, parsed body) to a request made on the host itself (bounded)."""
    parts = [f"curl -sS -m {timeout} -w '\\n%{{http_code}}' -X {method}"]
    if token:
        parts.append(f"-H 'Authorization: Bearer {token}'")
    if body is not None:
        parts.append(f"-H 'Content-Type: application/json' --data-binary {shlex.quote(json.dumps(body))}")
    if form_file:
        parts.append(f"-F file=@{form_file}")
    answer = sh(" ".join(parts) + f" {WEBUI}{path}")
    text, _, status = answer.stdout.rpartition("\n")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def key():
    return (REPO / ".lab" / "secrets" / "chat-api-key").read_text().strip()  # rag-embed's


def password():
    return PASSWORD_FILE.read_text().strip()


def sign_in():
    status, body = api("POST", "/api/v1/auths/signin", body={"email": EMAIL, "password": password()})
    assert status == "200", body
    return body["token"]


def file_ids(token):
    """The ids of the files Open WebUI holds (its list answers ``{"items": [...]}``)."""
    status, body = api("GET", "/api/v1/files/", token=token)
    assert status == "200", body
    return sorted(entry["id"] for entry in body["items"])


def active_since(unit):
    """When ``unit`` became active (monotonic µs) and when it left inactive to start."""
    shown = sh(f"systemctl show -p ActiveEnterTimestampMonotonic -p InactiveExitTimestampMonotonic {unit}").stdout
    values = dict(line.split("=", 1) for line in shown.split())
    return int(values["InactiveExitTimestampMonotonic"]), int(values["ActiveEnterTimestampMonotonic"])


@pytest.fixture(scope="module")
def measured():
    yield from measurements("rag")


@pytest.fixture(scope="module")
def stack(second_deploy, measured):
    started = time.monotonic()
    first = run_deploy("--limit", HOST, env=WITH_STACK)
    measured["first_deploy_s"] = round(time.monotonic() - started, 1)
    assert first.rc == 0, first.output[-5000:]
    return first


def test_the_stack_starts_in_health_order_on_loopback_only(stack, measured):
    for unit in [*UNITS, "gpufleet-rag-front"]:
        assert sh(f"systemctl is-active {unit}").stdout.strip() == "active", unit
    webui_start, webui_ready = active_since("gpufleet-rag-webui")
    for unit in UNITS[:-1]:  # each was ready (its ExecStartPost) before Open WebUI's start began
        assert active_since(unit)[1] <= webui_start, unit
    measured["webui_start_to_ready_s"] = round((webui_ready - webui_start) / 1e6, 1)
    front_start, _ = active_since("gpufleet-rag-front")
    assert front_start >= webui_ready  # the front after Open WebUI was ready
    listening = [line.split()[3] for line in sh("ss -Hltn").stdout.splitlines() if line.strip()]
    for port, where in (("3000", "127.0.0.1"), ("6333", "127.0.0.1"), ("3443", "127.0.0.1"), ("8444", "0.0.0.0")):
        addresses = {local.rsplit(":", 1)[0] for local in listening if local.endswith(f":{port}")}
        assert addresses == {where}, (port, addresses)
    address = sh("hostname -I").stdout.split()[0]  # its own address on its network: refused there
    assert sh(f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{address}:3000/health").stdout == "000"
    unit = sh("systemctl cat gpufleet-rag-webui").stdout
    assert "Requires=gpufleet-rag-vectordb.service" in unit
    assert "After=docker.service network-online.target gpufleet-rag-vectordb.service gpufleet-rag-chat.service" in unit


def test_the_host_by_host_checks_of_the_stack_pass(stack):
    checks, outcomes = run_checks(["tests/checks/test_rag.py"], [HOST])
    expected = {
        "test_both_units_run_and_start_at_boot",
        "test_open_webui_and_its_vector_database_listen_on_loopback_only",
        "test_open_webui_has_its_accounts_and_sign_up_is_off",
        "test_the_secret_key_is_open_webuis_account_alone",
        "test_where_the_gateway_serves_it_its_tls_front_answers_for_open_webui",
    }
    assert outcomes == {(check, HOST): "PASSED" for check in expected}, checks.stdout[-3000:]


def test_secrets_are_in_no_unit_and_no_docker_inspect_and_sign_up_is_off(stack):
    inspect = sh("docker inspect gpufleet-rag-webui gpufleet-rag-vectordb").stdout
    units = sh("cat /etc/systemd/system/gpufleet-rag-*.service").stdout
    secret_key = sh("cat /etc/gpufleet/secrets/rag-webui-secret-key").stdout.strip()
    assert secret_key and password()
    for text in (inspect, units):  # nor the key Open WebUI sends the (keyed) embedding service
        assert password() not in text and secret_key not in text and key() not in text
    modes = sh(
        "stat -c '%n %a %U' /etc/gpufleet/secrets/rag-webui-secret-key /etc/gpufleet/secrets/rag-webui-admin.json"
    )
    assert modes.stdout.split("\n")[:2] == [
        "/etc/gpufleet/secrets/rag-webui-secret-key 400 gpufleet-rag-webui",
        "/etc/gpufleet/secrets/rag-webui-admin.json 600 root",
    ]
    assert (
        json.loads(inspect)[0]["Config"]["User"]
        == sh("id -u gpufleet-rag-webui").stdout.strip() + ":" + sh("id -g gpufleet-rag-webui").stdout.strip()
    )
    status, config = api("GET", "/api/config")
    assert status == "200" and config["features"]["enable_signup"] is False and "onboarding" not in config
    status, refused = api(
        "POST", "/api/v1/auths/signup", body={"name": "Eve", "email": "eve@lab.test", "password": "x" * 16}
    )
    assert status == "403", refused
    assert sign_in()


def test_a_document_answers_a_question_through_the_fleets_embeddings_and_chroma(stack, measured):
    token = sign_in()
    sh(f"printf %s {shlex.quote(DOCUMENT)} > /tmp/vault.txt")
    status, uploaded = api("POST", "/api/v1/files/?process=true", token=token, form_file="/tmp/vault.txt")
    assert status == "200", uploaded

    def processed():
        return api("GET", f"/api/v1/files/{uploaded['id']}/process/status", token=token)[1].get("status") == "completed"

    assert until(processed, 60) is not None
    started = time.monotonic()
    status, answer = api(
        "POST",
        "/api/chat/completions",
        token=token,
        body={
            "model": "rag-chat",
            "stream": False,
            "params": {"temperature": 0, "max_tokens": 24},
            "messages": [{"role": "user", "content": QUESTION}],
            "files": [{"type": "file", "id": uploaded["id"]}],
        },
    )
    measured["api_answer_s"] = round(time.monotonic() - started, 1)
    assert status == "200", answer
    assert ANSWER in answer["sources"][0]["document"][0]  # retrieved from Chroma, embedded by rag-embed
    assert ANSWER in answer["choices"][0]["message"]["content"], answer["choices"][0]["message"]
    # the document and the question were embedded by rag-embed (its own metrics: tokens it read)
    metrics = sh(f"curl -s -m 5 -H 'Authorization: Bearer {key()}' http://127.0.0.1:8083/metrics").stdout
    read = [line.split()[1] for line in metrics.splitlines() if line.startswith("llamacpp:prompt_tokens_total ")]
    assert read and float(read[0]) > 0, metrics[-500:]
    collections = sh(
        "curl -s -m 5 http://127.0.0.1:6333/api/v2/tenants/default_tenant/databases/default_database/collections"
    )
    assert f"file-{uploaded['id']}" in collections.stdout


def _stopped_changing(read):
    """A condition that holds once ``read()`` gives the same text twice in a row."""
    seen = []

    def same_as_before():
        seen.append(read())
        return len(seen) > 1 and seen[-1] == seen[-2]

    return same_as_before


@pytest.fixture(scope="module")
def address(lab):
    """The host's address on its network, where the control node reaches it."""
    return lab[HOST]["address"]


def _https(url, timeout=30):
    """(status, body) of a GET checked against the lab's site CA, from the control node."""
    context = ssl.create_default_context(cafile=str(CA))
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:  # refused, reset, timed out (a TLS failure is an assertion's business)
        if isinstance(getattr(error, "reason", None), ssl.SSLError):
            raise
        return None, str(error).encode()


def test_beyond_the_host_only_the_gateway_serves_it_over_tls_with_the_sites_certificate(stack, address):
    """From the control node (on the gateway's allowed network): Open WebUI at the gateway's port, its
    certificate checked against the site's CA; the gateway's services' port does not lead there; Open
    WebUI itself and its front are not reachable at the host's address."""
    url = f"https://{address}:8444"
    assert until(lambda: _https(f"{url}/health", timeout=5)[0] == 200, 30) is not None
    status, body = _https(f"{url}/api/config")
    assert status == 200 and json.loads(body)["features"]["enable_signup"] is False
    assert _https(f"https://{address}:9443/api/config")[0] == 404
    for port in (3000, 3443):
        with socket.socket() as probe:
            probe.settimeout(5)
            assert probe.connect_ex((address, port)) != 0, port
    ssl.create_default_context(cafile=str(CA)).wrap_socket(
        socket.create_connection((address, 8444), timeout=10), server_hostname=address
    ).close()


def _spki_pin(address, port):
    """The base64 SHA-256 of the key of the certificate served at address:port, once Python has checked
    that certificate against the site's CA: what Chromium is told to trust (and nothing else)."""
    context = ssl.create_default_context(cafile=str(CA))
    with context.wrap_socket(socket.create_connection((address, port), timeout=10), server_hostname=address) as tls:
        der = tls.getpeercert(binary_form=True)
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    key = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=pem, capture_output=True, check=True).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=key, capture_output=True, check=True)
    return base64.b64encode(hashlib.sha256(spki.stdout).digest()).decode()


def test_in_a_real_browser_the_admin_uploads_a_document_and_sees_the_answer(stack, address, measured, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    document = tmp_path / "vault-notes.txt"
    document.write_text(DOCUMENT)
    url = f"https://{address}:8444"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    # the gateway's certificate, checked against the site's CA here first, is the one Chromium trusts
    options.add_argument(f"--ignore-certificate-errors-spki-list={_spki_pin(address, 8444)}")
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    browser = webdriver.Chrome(options=options, service=service)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{url}/auth")
        wait.until(shown.visibility_of_element_located((By.NAME, "email"))).send_keys(EMAIL)
        browser.find_element(By.ID, "password").send_keys(password() + Keys.ENTER)
        editor = wait.until(shown.presence_of_element_located((By.ID, "chat-input")))
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # a "what's new" dialog, if any
        started = time.monotonic()
        uploads = [e for e in browser.find_elements(By.CSS_SELECTOR, "input[type=file]") if e.get_attribute("multiple")]
        assert uploads, "no file input on the chat page"
        uploads[0].send_keys(str(document))
        wait.until(lambda _: "vault-notes" in browser.page_source)
        send = WebDriverWait(browser, 60).until(shown.element_to_be_clickable((By.ID, "send-message-button")))
        editor = browser.find_element(By.ID, "chat-input")
        editor.click()
        editor.send_keys(QUESTION)
        WebDriverWait(browser, 60).until(shown.element_to_be_clickable((By.ID, "send-message-button"))).click()
        del send

        def answered(_):
            replies = browser.find_elements(By.ID, "response-content-container")
            return replies and ANSWER in replies[-1].text

        WebDriverWait(browser, 120).until(answered)
        measured["browser_upload_to_answer_s"] = round(time.monotonic() - started, 1)
        reply = browser.find_elements(By.ID, "response-content-container")[-1]
        until(_stopped_changing(lambda: reply.text), 30)  # the screenshot once the answer stopped streaming
        browser.save_screenshot(str(ARTIFACTS / "rag-chat.png"))
    except Exception:
        browser.save_screenshot(str(ARTIFACTS / "rag-chat-failed.png"))
        (ARTIFACTS / "rag-chat-failed.html").write_text(browser.page_source)
        raise
    finally:
        browser.quit()


def test_a_second_run_changes_nothing(stack):
    again = run_deploy("--limit", HOST, env=WITH_STACK)
    assert again.rc == 0, again.output[-3000:]
    assert again.total_changed() == 0, again.changed()


def test_the_stacks_data_is_backed_up_and_restored_verified(stack, tmp_path, measured):
    """The stack's data archived at rest to the control node (root-only, checked); a document deleted
    afterwards comes back with the restore, Open WebUI answering again; a damaged backup is refused
    before the host is touched; a deploy then changes nothing."""
    token = sign_in()
    uploaded = file_ids(token)
    assert uploaded  # the document of the tests above
    started = time.monotonic()
    backed = run_deploy("--limit", HOST, f"dest={tmp_path}", deploy="operations.rag.backup.backed_up", env=WITH_STACK)
    measured["backup_s"] = round(time.monotonic() - started, 1)
    assert backed.rc == 0, backed.output[-3000:]
    archive, manifest = (
        tmp_path / "rag-stack.tar",
        json.loads((tmp_path / "rag-stack.gpufleet-backup.json").read_text()),
    )
    assert manifest["files"]["rag-stack.tar"] == {
        "size": archive.stat().st_size,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
    }
    assert oct(archive.stat().st_mode & 0o777) == "0o600" and manifest["host"] == HOST
    assert sh("ls /var/lib/gpufleet/rag-backup/outgoing").returncode != 0  # the host's copy is gone
    assert until(lambda: api("GET", "/api/config")[0] == "200", 60) is not None  # serving again
    for uploaded_id in uploaded:
        assert api("DELETE", f"/api/v1/files/{uploaded_id}", token=token)[0] == "200"
    assert file_ids(token) == []

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "rag-stack.gpufleet-backup.json").write_text(json.dumps(manifest))
    (damaged / "rag-stack.tar").write_bytes(archive.read_bytes()[:-1] + b"x")
    before = sh("stat -c %Y /var/lib/gpufleet/rag/webui/webui.db").stdout
    refused = run_deploy("--limit", HOST, f"src={damaged}", deploy="operations.rag.backup.restored", env=WITH_STACK)
    assert refused.rc != 0
    assert (
        f"{damaged}/rag-stack.tar: differs from its manifest (damaged or replaced); nothing was sent" in refused.output
    )
    assert sh("stat -c %Y /var/lib/gpufleet/rag/webui/webui.db").stdout == before

    started = time.monotonic()
    restored = run_deploy("--limit", HOST, f"src={tmp_path}", deploy="operations.rag.backup.restored", env=WITH_STACK)
    measured["restore_s"] = round(time.monotonic() - started, 1)
    assert restored.rc == 0, restored.output[-3000:]
    token = sign_in()
    assert file_ids(token) == uploaded
    collections = sh(
        "curl -s -m 5 http://127.0.0.1:6333/api/v2/tenants/default_tenant/databases/default_database/collections"
    ).stdout
    assert all(f"file-{uploaded_id}" in collections for uploaded_id in uploaded)  # the vectors came back too
    assert sh("ls -d /var/lib/gpufleet/rag/webui.before-restore").returncode == 0
    assert sh("stat -c %U /var/lib/gpufleet/rag/webui/webui.db").stdout.strip() == "gpufleet-rag-webui"
    again = run_deploy("--limit", HOST, env=WITH_STACK)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_a_host_that_leaves_rag_hosts_loses_the_units_and_keeps_the_data_unless_pruned(stack):
    left = run_deploy("--limit", HOST)
    assert left.rc == 0, left.output[-3000:]
    assert "Stop and disable gpufleet-rag-webui.service (the host left rag_hosts)" in left.output
    assert "Stop and disable gpufleet-rag-front.service (the gateway no longer serves the stack)" in left.output
    assert sh("systemctl is-active haproxy").stdout.strip() != "active"  # no longer a gateway
    assert sh("ls /etc/systemd/system/gpufleet-rag-front.service").returncode != 0
    assert (
        sh(
            "ls /etc/systemd/system/gpufleet-rag-webui.service /etc/systemd/system/gpufleet-rag-vectordb.service"
        ).returncode
        != 0
    )
    assert sh("docker ps -aq --filter name=gpufleet-rag-").stdout.strip() == ""
    kept = sh("ls /var/lib/gpufleet/rag/webui /var/lib/gpufleet/rag/vectordb").stdout
    assert "webui.db" in kept and "chroma.sqlite3" in kept
    assert run_deploy("--limit", HOST).total_changed() == 0
    # pruned: the data and the stack's secrets go too, once; then nothing is left to do
    pruned = run_deploy("--limit", HOST, "--data", "gpufleet_prune=true")
    assert pruned.rc == 0, pruned.output[-3000:]
    assert (
        "Remove the RAG stack's data /var/lib/gpufleet/rag (gpufleet_prune: the host left rag_hosts)" in pruned.output
    )
    assert sh("test -e /var/lib/gpufleet/rag").returncode != 0
    assert sh("ls /etc/gpufleet/secrets/ | grep -c '^rag-webui' || true").stdout.strip() == "0"
    assert run_deploy("--limit", HOST, "--data", "gpufleet_prune=true").total_changed() == 0
