"""The llama.cpp service runs for real on every lab host (the air-gapped one included), from the
staged weight volume, with its API key kept out of units, command lines and logs."""

import json
import subprocess
import time

import pytest

from operations.services import engines
from tests.lab import hosts as lab_hosts
from tests.lab import llamacpp

from .conftest import REPO, run_deploy

HOSTS = ["lab-1", "lab-gap-1"]
KEY = REPO / ".lab" / "secrets" / "chat-api-key"


def sh(name, command, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


@pytest.mark.parametrize("name", HOSTS)
def test_service_enabled_active_and_listening(second_deploy, lab_host, name):
    host = lab_host(name)
    assert host.service("gpufleet-chat").is_enabled
    assert host.service("gpufleet-chat").is_running
    # inference_listen's default: this host only
    assert host.socket("tcp://127.0.0.1:8080").is_listening and not host.socket("tcp://0.0.0.0:8080").is_listening


@pytest.mark.parametrize("name", HOSTS)
def test_models_listed_and_completion_returns_tokens(second_deploy, name):
    key = KEY.read_text().strip()
    models = json.loads(sh(name, f"curl -sf -H 'Authorization: Bearer {key}' http://127.0.0.1:8080/v1/models").stdout)
    assert [m["id"] for m in models["data"]] == ["chat"]
    completion = json.loads(
        sh(
            name,
            "curl -sf -H 'Authorization: Bearer " + key + "' "
            'http://127.0.0.1:8080/v1/completions -d \'{"prompt": "hello", '
            '"max_tokens": 6}\'',
        ).stdout
    )
    assert completion["usage"]["completion_tokens"] == 6
    assert completion["choices"][0]["finish_reason"] == "length"


def test_request_without_or_with_wrong_key_is_refused(second_deploy):
    assert sh("lab-1", "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/v1/models").stdout == "401"
    assert (
        sh(
            "lab-1",
            "curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer wrong' http://127.0.0.1:8080/v1/models",
        ).stdout
        == "401"
    )


def test_api_key_only_in_the_services_own_key_file(second_deploy, lab_host):
    key = KEY.read_text().strip()
    host = lab_host("lab-1")
    key_file = host.file("/etc/gpufleet/secrets/chat.key")
    assert (key_file.mode, key_file.user, key_file.group) == (0o400, "gpufleet-chat", "gpufleet-chat")
    assert key_file.content_string == f"{key}\n"
    assert host.file("/etc/gpufleet/secrets").mode == 0o700
    assert not host.file("/etc/gpufleet/secrets/chat.env").exists  # llama.cpp reads its key from the file
    unit = host.file("/etc/systemd/system/gpufleet-chat.service").content_string
    assert (
        "-v /etc/gpufleet/secrets/chat.key:/run/secrets/gpufleet-api-key:ro" in unit
        and "--api-key-file /run/secrets/gpufleet-api-key" in unit
        and key not in unit
    )
    # The key goes in on stdin into a 0600 pattern file, so no command line (not even grep's) holds it.
    everywhere = sh(
        "lab-1",
        "umask 077; p=$(mktemp); cat > $p; "
        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done | grep -F -c -f $p; "
        "journalctl --no-pager -u gpufleet-chat -u docker | grep -F -c -f $p; "
        "docker logs gpufleet-chat 2>&1 | grep -F -c -f $p; "
        "docker inspect gpufleet-chat | grep -F -c -f $p; "
        "grep -F -c -f $p /etc/gpufleet/secrets/chat.key; rm -f $p",
        input=key + "\n",
    ).stdout.split()
    # No process's command line, no journal, no container log, not in docker inspect; only the key file.
    assert everywhere == ["0", "0", "0", "0", "1"]


def test_weights_read_only_and_mounted_ro(second_deploy, lab_host):
    host = lab_host("lab-1")
    model = host.file("/srv/gpufleet/weights/tiny/tiny.gguf")
    assert (model.mode, model.user) == (0o444, "root")
    mounts = json.loads(sh("lab-1", "docker inspect -f '{{json .Mounts}}' gpufleet-chat").stdout)
    assert sorted((m["Source"], m["Destination"], m["RW"]) for m in mounts) == [
        ("/etc/gpufleet/secrets/chat.key", "/run/secrets/gpufleet-api-key", False),
        ("/srv/gpufleet/weights", "/models", False),
    ]
    config = json.loads(sh("lab-1", "docker inspect -f '{{json .Config}}' gpufleet-chat").stdout)
    # The service's own account: its own UID, no login, no home; not root and not the shared nobody.
    account = sh("lab-1", "getent passwd gpufleet-chat").stdout.strip().split(":")
    assert config["User"] == f"{account[2]}:{account[3]}" and 60600 <= int(account[2]) < 61184
    assert account[5:] == ["/nonexistent", "/usr/sbin/nologin"]
    host_config = json.loads(sh("lab-1", "docker inspect -f '{{json .HostConfig}}' gpufleet-chat").stdout)
    assert host_config["NetworkMode"] == "host"
    assert host_config["Memory"] == 1 << 30
    assert host_config["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "50m"}}


def _wait_active(name, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sh(name, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/health").stdout == "200":
            return True
        time.sleep(1)
    return False


def test_killed_container_comes_back_through_systemd(second_deploy):
    before = sh("lab-2", "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()
    sh("lab-2", "docker kill gpufleet-chat")
    assert _wait_active("lab-2"), "the service did not come back after its container was killed"
    after = sh("lab-2", "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()
    assert after and after != before


def test_corrupt_weight_is_named_and_refused_then_repaired(second_deploy):
    sh(
        "lab-2",
        "chmod u+w /srv/gpufleet/weights/tiny/tiny.gguf && "
        "printf 'XXXX' | dd of=/srv/gpufleet/weights/tiny/tiny.gguf bs=1 seek=4096 conv=notrunc 2>/dev/null && "
        "touch -d '2001-01-01' /srv/gpufleet/weights/tiny/tiny.gguf",
    )
    sh("lab-2", "systemctl restart gpufleet-chat || true")
    journal = sh("lab-2", "journalctl --no-pager -u gpufleet-chat -n 30").stdout
    assert "/srv/gpufleet/weights/tiny/tiny.gguf: SHA-256 differs from the manifest (corrupt)" in journal
    assert sh("lab-2", "systemctl is-active gpufleet-chat").stdout.strip() != "active"
    repair = run_deploy("--limit", "lab-2")
    assert repair.rc == 0, repair.output[-3000:]
    assert "tiny.gguf: SHA-256 differs from the manifest; sending it again" in repair.output
    assert _wait_active("lab-2")


@pytest.mark.parametrize("engine", ["vllm", "tgi", "ollama"])
def test_gpu_engine_units_verify_with_systemd(second_deploy, engine):
    from operations.services import engines, inference

    service = {
        "name": f"check-{engine}",
        "engine": engine,
        "model": "tiny/model",
        "image": {
            "vllm": "vllm/vllm-openai:v0.6.3",
            "tgi": "ghcr.io/huggingface/text-generation-inference:2.4.1",
            "ollama": "ollama/ollama:0.3.14",
        }[engine],
        "gpus": [0],
        "memory": "32g",
    }
    engines.check_service(0, service)
    env = "/etc/gpufleet/secrets/chat.env" if engines.ENGINES[engine]["api_key_env"] else None
    unit = inference.unit_text(service, "/srv/gpufleet/weights", env, use_gpus=True, start_timeout=600)
    path = f"/tmp/gpufleet-check-{engine}.service"
    sh("lab-1", f"cat > {path}", input=unit)
    verify = sh("lab-1", f"systemd-analyze verify {path} 2>&1; echo rc=$?")
    assert verify.stdout.strip().endswith("rc=0"), verify.stdout
    assert '--gpus "\\"device=0\\""' in unit and "--pull never" in unit


def test_systemd_reads_back_exactly_the_words_gpufleet_writes(lab):
    """The quoting of engine arguments, round-tripped through a real systemd: a oneshot unit written
    with gpufleet's quoting runs a program that saves its argv, NUL-separated; it must be the words."""
    from operations.core import systemd_syntax
    from tests.unit.test_systemd_syntax import HARD

    program = "import sys; open('/run/gpufleet-argv', 'wb').write(b'\\0'.join(a.encode() for a in sys.argv[1:]))"
    unit = (
        "[Unit]\nDescription=gpufleet quoting round trip\n[Service]\nType=oneshot\n"
        f"ExecStart={systemd_syntax.command_line(['/usr/bin/python3', '-c', program, *HARD])}\n"
    )
    path = "/etc/systemd/system/gpufleet-quoting.service"
    try:
        written = sh(
            "lab-1",
            f"cat > {path} && systemd-analyze verify {path} && systemctl daemon-reload && "
            "systemctl start gpufleet-quoting.service && cat /run/gpufleet-argv",
            input=unit,
        )
        assert written.returncode == 0, written.stderr
        assert written.stdout.split("\0") == HARD
        shown = sh("lab-1", "systemctl show -p ExecStart --value gpufleet-quoting.service").stdout
        assert "argv[]=/usr/bin/python3 -c" in shown
    finally:
        sh("lab-1", f"rm -f {path} /run/gpufleet-argv && systemctl daemon-reload")


def test_weights_touched_but_unchanged_are_re_recorded_without_a_restart(second_deploy):
    """A tool refreshed the weight files' mtimes without changing a byte: the next deploy hashes them,
    finds them intact and re-records them; the serving container is not restarted (issue 21's outage)."""
    before = sh("lab-1", "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()
    sh("lab-1", "touch /srv/gpufleet/weights/tiny/*")
    touched = run_deploy("--limit", "lab-1")
    assert touched.rc == 0, touched.output[-3000:]
    assert "moved file(s) hashed intact and re-recorded" in touched.output
    changed = touched.changed()
    assert any(name.endswith("Stage weight volume tiny") for name in changed), changed
    assert not any("Restart gpufleet-chat" in name for name in changed), changed
    assert sh("lab-1", "docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip() == before
    again = run_deploy("--limit", "lab-1")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_captured_llama_server_help_is_the_lab_binarys(lab):
    """operations/services/engine_cli/llama-server.help is what the lab's llama-server says: the lab
    built (or took from its cache) the binary before any e2e test, so this never skips."""
    binary = llamacpp.CACHE_DIR / "llamacpp" / llamacpp.key() / "llama-server"
    assert binary.exists(), f"{binary}: the lab came up without its llama-server"
    live = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    assert engines.flags_from_help(live.stdout + live.stderr) == engines.accepted_flags("llamacpp")
