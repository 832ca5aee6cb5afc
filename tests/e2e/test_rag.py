"""
The RAG stack on the lab: lab-gap-1 (air-gapped: no route out; a sudo login; everything from the
bundle) in rag_hosts (GPUFLEET_LAB_RAG), with
Open WebUI and Chroma's server (the lab's images of PyPI's open-webui 0.12.4 and chromadb 1.5.9), chat
and embeddings from two llama.cpp services of Gemma 3 270M. The units start in health order, Open
WebUI answers on loopback only, its secrets are in no unit and no ``docker inspect``, sign-up is off
and the admin gpufleet created signs in; a document uploaded through Open WebUI's API is embedded
through the fleet, stored in Chroma and answers a question whose answer only it holds; in a real
browser (Debian's chromium through its chromium-driver, driven by Selenium) the admin signs in,
uploads the document, asks and sees the answer (screenshot: .lab/artifacts/rag-chat.png). A second
run changes nothing; a run without the stack removes its units and keeps its data. Measured:
.lab/measurements/rag.json.
"""

import json
import shlex
import socket
import subprocess
import time

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
    for unit in UNITS:
        assert sh(f"systemctl is-active {unit}").stdout.strip() == "active", unit
    webui_start, webui_ready = active_since("gpufleet-rag-webui")
    for unit in UNITS[:-1]:  # each was ready (its ExecStartPost) before Open WebUI's start began
        assert active_since(unit)[1] <= webui_start, unit
    measured["webui_start_to_ready_s"] = round((webui_ready - webui_start) / 1e6, 1)
    listening = [line.split()[3] for line in sh("ss -Hltn").stdout.splitlines() if line.strip()]
    for port in ("3000", "6333"):
        addresses = {local.rsplit(":", 1)[0] for local in listening if local.endswith(f":{port}")}
        assert addresses == {"127.0.0.1"}, (port, addresses)
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


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def forwarded(stack):
    """Open WebUI on a loopback port of this machine, through SSH to the host's loopback (how a user
    reaches it: ssh -L)."""
    port = _free_port()
    tunnel = subprocess.Popen(
        ["ssh", "-F", str(lab_hosts.SSH_CONFIG), "-N", "-o", "ExitOnForwardFailure=yes"]
        + ["-L", f"127.0.0.1:{port}:127.0.0.1:3000", HOST]
    )
    try:
        assert until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 15) is not None
        yield f"http://127.0.0.1:{port}"
    finally:
        tunnel.terminate()
        tunnel.wait(10)


def test_in_a_real_browser_the_admin_uploads_a_document_and_sees_the_answer(forwarded, measured, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    document = tmp_path / "vault-notes.txt"
    document.write_text(DOCUMENT)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    browser = webdriver.Chrome(options=options, service=service)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{forwarded}/auth")
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


def test_a_host_that_leaves_rag_hosts_loses_the_units_and_keeps_the_data(stack):
    left = run_deploy("--limit", HOST)
    assert left.rc == 0, left.output[-3000:]
    assert "Stop and disable gpufleet-rag-webui.service (the host left rag_hosts)" in left.output
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
