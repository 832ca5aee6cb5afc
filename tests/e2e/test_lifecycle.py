"""Declared state: what the inventory no longer names leaves the host. A renamed service's
predecessor is stopped and removed (unit, container, secrets, account) before the new unit starts
on the same port; a re-run changes nothing; the original inventory brings the original back."""

import hashlib
import json

from tests.lab import hosts as lab_hosts
from tests.lab.llamacpp import image_tag

from .conftest import REPO, run_deploy

HOST = "lab-2"
KEY = REPO / ".lab" / "secrets" / "chat-api-key"


def sh(command):
    return lab_hosts.ssh({"name": HOST}, command, check=False)


def _renamed(name):
    service = {
        "name": name,
        "engine": "llamacpp",
        "image": image_tag(),
        "model": "tiny/tiny.gguf",
        "port": 8080,
        "memory": "1g",
        "args": ["--ctx-size", "256", "--threads", "1"],
        "api_key_file": str(KEY),
    }
    return ["--data", f"inference_services={json.dumps([service])}"]


def _answers():
    key = KEY.read_text().strip()
    answer = sh(
        f"curl -sf -m 30 -H 'Authorization: Bearer {key}' http://127.0.0.1:8080/v1/completions "
        '-d \'{"prompt": "hello", "max_tokens": 4}\''
    )
    return answer.returncode == 0 and json.loads(answer.stdout)["usage"]["completion_tokens"] == 4


def _left_of(name):
    """Whatever of service ``name`` is on the host: unit, container, secret files, account."""
    return sh(
        f"ls /etc/systemd/system/gpufleet-{name}.service /etc/gpufleet/secrets/{name}.key "
        f"/etc/gpufleet/secrets/{name}.env 2>/dev/null; docker ps -aq -f name=^gpufleet-{name}$; "
        f"getent passwd gpufleet-{name}; getent group gpufleet-{name}; "
        f"systemctl list-units --all --no-legend gpufleet-{name}.service | grep -v not-found"
    ).stdout.strip()


def test_a_renamed_service_frees_its_port_and_leaves_nothing_behind(second_deploy):
    assert _left_of("chat")
    try:
        renamed = run_deploy("--limit", HOST, *_renamed("assistant"))
        assert renamed.rc == 0, renamed.output[-3000:]
        out = renamed.output
        assert out.index("Stop and disable gpufleet-chat.service") < out.index("Run gpufleet-assistant")
        assert _left_of("chat") == ""
        assert sh("systemctl is-active gpufleet-assistant").stdout.strip() == "active" and _answers()
        again = run_deploy("--limit", HOST, *_renamed("assistant"))
        assert again.rc == 0 and again.total_changed() == 0, again.changed()
    finally:
        back = run_deploy("--limit", HOST)
    assert back.rc == 0, back.output[-3000:]
    assert _left_of("assistant") == ""
    assert sh("systemctl is-active gpufleet-chat").stdout.strip() == "active" and _answers()


def test_an_empty_service_list_removes_every_service(second_deploy):
    try:
        emptied = run_deploy("--limit", HOST, "--data", "inference_services=[]")
        assert emptied.rc == 0, emptied.output[-3000:]
        assert _left_of("chat") == ""
        assert sh("ss -Hltn 'sport = :8080'").stdout.strip() == ""
        # nothing left to guard: gpufleet's firewall table and unit are gone too
        assert sh("nft list table inet gpufleet").returncode != 0
        assert sh("test -e /etc/systemd/system/gpufleet-firewall.service").returncode == 1
        record = json.loads(sh("cat /etc/gpufleet/host.json").stdout)
        assert record["services"] == [] and record["firewall"] is False
    finally:
        back = run_deploy("--limit", HOST)
    assert back.rc == 0, back.output[-3000:]
    assert _answers()


def test_prune_removes_images_and_volumes_no_service_uses(second_deploy):
    """gpufleet_prune on lab-2: an image tag and a weight volume that no service uses are removed, the
    running service's image and volume stay, and a re-run changes nothing."""
    made = sh(
        "echo old > /tmp/retired && tar -C /tmp -c retired | docker import - gpufleet-lab/retired:1 && "
        "mkdir -p /srv/gpufleet/weights/retired && echo old > /srv/gpufleet/weights/retired/model.gguf"
    )
    assert made.returncode == 0, made.stderr
    running = sh("docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip()
    pruned = run_deploy("--limit", HOST, "--data", "gpufleet_prune=true")
    assert pruned.rc == 0, pruned.output[-3000:]
    assert list(pruned.changed()) == [  # lab-2 serves: its services' steps after the unit come in its batch
        "Service restarts, host by host | Remove images and weight volumes no service uses (gpufleet_prune)"
    ], pruned.changed()
    assert sh("docker image inspect gpufleet-lab/retired:1").returncode != 0
    assert sh("test -e /srv/gpufleet/weights/retired").returncode == 1
    assert sh(f"docker image inspect {image_tag()}").returncode == 0
    assert sh("test -s /srv/gpufleet/weights/tiny/tiny.gguf").returncode == 0
    assert sh("docker inspect -f '{{.Id}}' gpufleet-chat").stdout.strip() == running and _answers()
    again = run_deploy("--limit", HOST, "--data", "gpufleet_prune=true")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_a_weight_volume_is_backed_up_and_restored_verified(second_deploy, tmp_path):
    """lab-2's volume tiny is copied to the control node with its manifest; a damaged copy is refused
    before the host is touched; the volume, deleted on the host, comes back verified from the copy
    and serves; a deploy then changes nothing."""
    model = (REPO / ".lab" / "models" / "tiny" / "tiny.gguf").read_bytes()
    backup = run_deploy(
        "--limit", HOST, "volume=tiny", f"dest={tmp_path}", deploy="operations.weights.backup.backed_up"
    )
    assert backup.rc == 0, backup.output[-3000:]
    manifest = json.loads((tmp_path / "tiny.gpufleet-backup.json").read_text())
    assert manifest["host"] == HOST and manifest["path"] == "/srv/gpufleet/weights/tiny"
    assert manifest["files"] == {"tiny.gguf": {"size": len(model), "sha256": hashlib.sha256(model).hexdigest()}}
    assert (tmp_path / "tiny" / "tiny.gguf").read_bytes() == model

    copy = tmp_path / "tiny" / "tiny.gguf"
    copy.write_bytes(model[:-1] + bytes([model[-1] ^ 1]))
    before = sh("stat -c %Y /srv/gpufleet/weights/tiny/tiny.gguf").stdout
    refused = run_deploy("--limit", HOST, "volume=tiny", f"src={tmp_path}", deploy="operations.weights.backup.restored")
    assert refused.rc != 0
    assert (
        f"{tmp_path}/tiny: the backup differs from its manifest (tiny.gguf): damaged; nothing was sent"
        in refused.output
    ), refused.output[-3000:]
    assert sh("stat -c %Y /srv/gpufleet/weights/tiny/tiny.gguf").stdout == before
    copy.write_bytes(model)

    sh("systemctl stop gpufleet-chat && rm -rf /srv/gpufleet/weights/tiny")
    restored = run_deploy(
        "--limit", HOST, "volume=tiny", f"src={tmp_path}", deploy="operations.weights.backup.restored"
    )
    assert restored.rc == 0, restored.output[-3000:]
    assert sh("sha256sum /srv/gpufleet/weights/tiny/tiny.gguf").stdout.split()[0] == hashlib.sha256(model).hexdigest()
    assert sh("systemctl start gpufleet-chat").returncode == 0 and _answers()
    again = run_deploy("--limit", HOST)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()
