"""Connected sites: images pulled (digest-pinned, tags checked against the registry), registry
logins, weight volumes from a control-node directory or a hub: given these facts, these commands."""

import base64
import hashlib
import json
import os
import subprocess
import sys

import pytest

from operations import TEMPLATES
from operations.container import docker
from operations.container import images as docker_images
from operations.core.errors import ConfigError
from operations.weights import hub as hf_hub
from operations.weights import volumes as weights

REG = "10.0.0.5:5000/team/llama-server"
DIGEST = "sha256:" + "a" * 64
MOVED = "sha256:" + "b" * 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_absent_image_is_pulled_and_its_digests_recorded(run_op):
    commands, _ = run_op(docker_images.pulled, {}, image=f"{REG}:v1")
    assert commands == [
        f"{docker_images.pull_command(f'{REG}:v1')} && mkdir -p /var/lib/gpufleet/images && docker image inspect "
        f"--format '{{{{json .RepoDigests}}}}' {REG}:v1 > "
        "/var/lib/gpufleet/images/10.0.0.5_5000_team_llama-server_v1.json"
    ]


# Docker's own words when Docker Hub refuses a pull for its rate limit (docker/docs#22134)
HUB_429 = (
    "Error response from daemon: toomanyrequests: You have reached your pull rate limit. You may increase the "
    "limit by authenticating and upgrading: https://www.docker.com/increase-rate-limit"
)


@pytest.mark.parametrize(
    "says, status, named",
    [(HUB_429, 1, True), ("Error response from daemon: manifest unknown", 1, False), ("sha256:" + "c" * 64, 0, False)],
)
def test_a_pull_refused_for_the_rate_limit_is_named_with_what_to_do(tmp_path, says, status, named):
    """The pull command run by sh with a stand-in `docker` on PATH that says what Docker says."""
    fake = tmp_path / "docker"
    fake.write_text(f"#!/bin/sh\necho {json.dumps(says)} >&2\nexit {status}\n")
    fake.chmod(0o755)
    done = subprocess.run(
        ["sh", "-c", docker_images.pull_command("vllm/vllm-openai:v0.6.3")],
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == status
    advice = (
        "gpufleet: docker.io refused the pull of vllm/vllm-openai:v0.6.3: too many pulls from this address "
        "(HTTP 429, its rate limit). Let one host pull for the site (gpufleet_stage_via)"
    )
    assert (advice in done.stderr) == named, done.stderr
    assert status == 0 or says in done.stderr  # Docker's own words follow


def test_the_registry_a_reference_names():
    assert docker_images.registry_of("vllm/vllm-openai:v0.6.3") == "docker.io"
    assert docker_images.registry_of("nginx") == "docker.io"
    assert docker_images.registry_of("10.0.0.5:5000/team/x:v1") == "10.0.0.5:5000"
    assert docker_images.registry_of("nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3") == "nvcr.io"
    assert docker_images.registry_of("localhost/x") == "localhost"


def test_digest_pinned_image_present_asks_no_registry(run_op):
    local = {"id": "sha256:" + "c" * 64, "repo_digests": [f"{REG}@{DIGEST}"]}
    commands, noops = run_op(
        docker_images.pulled,
        {"LocalImage": local, "RegistryDigest": {"error": "must not ask"}},
        image=f"{REG}@{DIGEST}",
    )
    assert commands == [] and noops[0].startswith(f"{REG}@{DIGEST} present")


def test_tag_matching_its_registry_is_a_noop(run_op):
    local = {"id": "sha256:" + "c" * 64, "repo_digests": [f"{REG}@{DIGEST}"]}
    commands, noops = run_op(
        docker_images.pulled, {"LocalImage": local, "RegistryDigest": {"digest": DIGEST}}, image=f"{REG}:v1"
    )
    assert commands == [] and noops == [f"{REG}:v1 at {DIGEST[:19]}, as its registry serves it"]


def test_moved_tag_is_reported_and_followed_only_when_asked(run_op, caplog):
    local = {"id": "sha256:" + "c" * 64, "repo_digests": [f"{REG}@{DIGEST}"]}
    facts = {"LocalImage": local, "RegistryDigest": {"digest": MOVED}}
    commands, noops = run_op(docker_images.pulled, facts, image=f"{REG}:v1")
    assert commands == [] and noops == [f"{REG}:v1: tag moved in the registry; not followed"]
    assert f"its registry now serves {MOVED} for this tag; this host keeps {REG}@{DIGEST}" in caplog.text
    commands, _ = run_op(docker_images.pulled, facts, image=f"{REG}:v1", follow_tag=True)
    assert commands[0].startswith(f"{docker_images.pull_command(f'{REG}:v1')} && ")


def test_unreachable_registry_keeps_the_image_and_says_so(run_op, caplog):
    local = {"id": "sha256:" + "c" * 64, "repo_digests": [f"{REG}@{DIGEST}"]}
    commands, _ = run_op(
        docker_images.pulled, {"LocalImage": local, "RegistryDigest": {"error": "No route to host"}}, image=f"{REG}:v1"
    )
    assert commands == [] and "could not ask its registry for the tag's digest (No route to host)" in caplog.text


def test_registry_digest_fact_keeps_the_reason():
    fact = docker_images.RegistryDigest()
    assert fact.process([DIGEST]) == {"digest": DIGEST}
    assert fact.process([f"gpufleet-registry-digest: {REG}:v1: HTTP Error 401: Unauthorized", "__failed__"]) == {
        "error": "HTTP Error 401: Unauthorized"
    }


def test_repository_of_references():
    assert docker_images.repository(f"{REG}:v1") == REG
    assert docker_images.repository(f"{REG}@{DIGEST}") == REG
    assert docker_images.repository("vllm/vllm-openai:v0.6.3") == "vllm/vllm-openai"
    assert docker_images.repository("localhost:5000/x") == "localhost:5000/x"


@pytest.mark.parametrize(
    "image, short",
    [
        ("docker.io/library/nginx:1.27", "nginx"),
        ("library/nginx:1.27", "nginx"),
        ("docker.io/nginx:1.27", "nginx"),
        ("index.docker.io/library/busybox", "busybox"),
        ("docker.io/vllm/vllm-openai:v0.6.3", "vllm/vllm-openai"),
        ("ghcr.io/ggml-org/llama.cpp:server", "ghcr.io/ggml-org/llama.cpp"),
    ],
)
def test_docker_hub_references_match_the_short_form_docker_records(image, short):
    """Docker writes a Docker Hub image's RepoDigests in its short form (``nginx@sha256:...``), so a
    reference written in full is compared in that form: its tag is not reported as moved on every run."""
    assert docker_images.repository(image) == short
    local = {"id": "sha256:" + "c" * 64, "repo_digests": [f"{short}@{DIGEST}"]}
    assert docker_images.has_digest(local, image, DIGEST)


def test_login_is_compared_by_hash_and_the_password_goes_on_stdin(run_op):
    wanted = hashlib.sha256(base64.b64encode(b"ops:s3cret")).hexdigest()
    commands, noops = run_op(
        docker_images.logged_in, {"RegistryLogin": wanted}, registry="r:5000", username="ops", password="s3cret"
    )
    assert commands == [] and noops == ["Docker logged in to r:5000 as ops"]
    commands, _ = run_op(
        docker_images.logged_in, {"RegistryLogin": None}, registry="r:5000", username="ops", password="s3cret"
    )
    assert len(commands) == 1 and commands[0].startswith("FunctionCommand(_login, ['r:5000', 'ops', ")

    class Shell:
        def send(self, command, data):
            self.sent = (command, data)

    shell = Shell()
    docker_images._login(None, None, shell, "r:5000", "ops", "s3cret")
    assert shell.sent == ("docker login --username ops --password-stdin r:5000 >/dev/null", "s3cret")


def test_login_file_must_be_private_and_well_formed(tmp_path):
    login = tmp_path / "login"
    login.write_text("ops:s3cret\n")
    login.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others than its owner \(mode 644\); chmod 600"):
        docker.read_login(str(login))
    login.chmod(0o600)
    assert docker.read_login(str(login)) == ("ops", "s3cret")
    login.write_text("just-a-password\n")
    with pytest.raises(ConfigError, match="its first line must be USERNAME:PASSWORD"):
        docker.read_login(str(login))


def test_mirrors_go_into_daemon_json_only_when_set():
    assert "registry-mirrors" not in docker.daemon_settings("50m", 3, {})
    assert docker.daemon_settings("50m", 3, {}, ["https://m:5000"])["registry-mirrors"] == ["https://m:5000"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"hf": "org/model", "revision": "main"}, "revision: 'main' is a branch or tag, which moves"),
        ({"hf": "org/model"}, "revision: required"),
        ({"hf": "not a repo", "revision": COMMIT}, "is not a repository id"),
        ({"hf": "org/model", "revision": COMMIT, "token": "x"}, "unknown key 'token'"),
        ({"from": "/nonexistent/dir"}, "/nonexistent/dir: no such directory on the control node"),
        ({"from": "/tmp", "hf": "org/model"}, "a dict with 'from'"),
        (
            {"hf": "org/model", "revision": COMMIT, "ignore_patterns": ["original/", 3]},
            "ignore_patterns: ['original/', 3]",
        ),
        (
            {"hf": "org/model", "revision": COMMIT, "allow_patterns": []},
            "allow_patterns: []: a glob or a list of globs",
        ),
    ],
)
def test_bad_volume_names_the_field(spec, message):
    with pytest.raises(ConfigError) as error:
        weights.check_volumes({"inference_weight_volumes": {"qwen": spec}}, "gpu-3")
    assert error.value.field == "inference_weight_volumes['qwen']"
    assert message in str(error.value) and "gpu-3" in str(error.value)


def test_branch_accepted_when_followed_and_hub_volume_refused_offline():
    weights.check_volumes(
        {
            "inference_weight_volumes": {"q": {"hf": "org/model", "revision": "main"}},
            "inference_weights_follow_branch": True,
        },
        "gpu-3",
    )
    with pytest.raises(ConfigError, match="a hub volume on an offline host"):
        weights.check_volumes(
            {"inference_weight_volumes": {"q": {"hf": "org/model", "revision": COMMIT}}, "gpufleet_offline": True},
            "gpu-3",
        )


def test_token_file_must_be_root_only(tmp_path):
    token = tmp_path / "token"
    token.write_text("hf_x\n")
    token.chmod(0o640)
    with pytest.raises(ConfigError, match="token_file: .*readable by others than its owner"):
        weights.check_volumes(
            {"inference_weight_volumes": {"q": {"hf": "o/m", "revision": COMMIT, "token_file": str(token)}}}, "h"
        )


def test_model_must_be_in_a_volume_and_in_its_directory(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    data = {"inference_weight_volumes": {"local": {"from": str(tmp_path)}, "hub": {"hf": "o/m", "revision": COMMIT}}}
    weights.check_model(0, "local/m.gguf", data, "h")
    weights.check_model(0, "hub/anything.gguf", data, "h")  # listed by the hub: checked when fetched
    with pytest.raises(
        ConfigError,
        match=r"inference_services\[1\]\.model: other/m.gguf: volume 'other' is in no "
        r"source.*\(hub, local\)",
    ):
        weights.check_model(1, "other/m.gguf", data, "h")
    with pytest.raises(ConfigError, match=r"local/x.gguf: no 'x.gguf' in volume 'local'"):
        weights.check_model(1, "local/x.gguf", data, "h")


def test_directory_manifest_hashes_once_and_again_after_a_change(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "HASH_CACHE", tmp_path / "cache")
    (tmp_path / "w" / "sub").mkdir(parents=True)
    (tmp_path / "w" / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "w" / "sub" / "b.json").write_bytes(b"{}")
    first = weights.directory_manifest.__wrapped__(str(tmp_path / "w"))
    assert first == {
        "a.bin": {"size": 10, "sha256": hashlib.sha256(b"x" * 10).hexdigest()},
        "sub/b.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
    }
    (tmp_path / "w" / "a.bin").write_bytes(b"y" * 10)
    os.utime(tmp_path / "w" / "a.bin", ns=(1, 1))
    assert (
        weights.directory_manifest.__wrapped__(str(tmp_path / "w"))["a.bin"]["sha256"]
        == hashlib.sha256(b"y" * 10).hexdigest()
    )


def test_fetched_volume_is_left_alone_when_its_record_holds(run_op):
    volume = {"source": {"repo": "o/m", "commit": COMMIT}, "intact": True, "files": 3}
    commands, noops = run_op(hf_hub.fetched, {"HubVolume": volume}, repo="o/m", revision=COMMIT, dest="/srv/w/q")
    assert commands == [] and noops == [f"/srv/w/q: o/m@{COMMIT[:12]}, 3 files intact"]


@pytest.mark.parametrize(
    "volume",
    [
        {"source": None, "intact": False, "files": 0},
        {"source": {"repo": "o/m", "commit": COMMIT}, "intact": False, "files": 3},
        {"source": {"repo": "o/m", "commit": "f" * 40}, "intact": True, "files": 3},
    ],
)
def test_fetched_volume_runs_the_fetcher_otherwise(run_op, volume):
    commands, _ = run_op(
        hf_hub.fetched,
        {"HubVolume": volume},
        repo="o/m",
        revision=COMMIT,
        dest="/srv/w/q",
        endpoint="http://hub:8090",
        token_file="/etc/gpufleet/secrets/hf-q.token",
    )
    assert commands == [
        "HF_ENDPOINT=http://hub:8090 HF_HOME=/var/lib/gpufleet/hf-home HF_HUB_DISABLE_PROGRESS_BARS=1 "
        "HF_HUB_DISABLE_TELEMETRY=1 PYTHONPATH=/usr/local/lib/gpufleet/hf/site /usr/local/lib/gpufleet/gpufleet-hf-fetch"
        f" fetch o/m {COMMIT} /srv/w/q --margin 0 --token-file /etc/gpufleet/secrets/hf-q.token"
    ]


def test_followed_branch_is_fetched_when_it_moves(run_op):
    volume = {"source": {"repo": "o/m", "commit": COMMIT}, "intact": True, "files": 3}
    commands, _ = run_op(
        hf_hub.fetched, {"HubVolume": volume, "HubRevision": COMMIT}, repo="o/m", revision="main", dest="/srv/w/q"
    )
    assert commands == []
    commands, _ = run_op(
        hf_hub.fetched, {"HubVolume": volume, "HubRevision": "e" * 40}, repo="o/m", revision="main", dest="/srv/w/q"
    )
    assert commands and commands[0].endswith(f"fetch o/m {'e' * 40} /srv/w/q --margin 0")


def test_lock_pins_every_wheel_of_each_target():
    lock = json.loads(hf_hub.LOCK.read_text())
    assert set(lock["targets"]) >= {"cp311-x86_64", "cp312-x86_64", "cp310-x86_64", "cp312-aarch64"}
    for target, wheels in lock["targets"].items():
        assert any(name.startswith(f"huggingface_hub-{lock['huggingface_hub']}-") for name in wheels), target
        assert all(len(digest) == 64 for digest in wheels.values())
        assert not any(name.startswith("hf_xet-") for name in wheels)


@pytest.fixture
def mirror():
    """A pull-through mirror stand-in on loopback: it serves one tag's digest, as a registry does
    (HEAD /v2/NAME/manifests/TAG, Docker-Content-Digest), and records what it was asked."""
    import http.server
    import threading

    asked = []

    class Mirror(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            asked.append(self.path)
            found = self.path == "/v2/library/nginx/manifests/1.27"
            self.send_response(200 if found else 404)
            if found:
                self.send_header("Docker-Content-Digest", DIGEST)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()


def registry_digest(image, daemon_json):
    return subprocess.run(
        [sys.executable, str(TEMPLATES / "gpufleet-registry-digest"), image],
        env={**os.environ, "GPUFLEET_DOCKER_DAEMON_JSON": str(daemon_json)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_docker_hub_tag_is_asked_of_the_mirrors_first_as_docker_pulls_it(mirror, tmp_path):
    url, asked = mirror
    daemon_json = tmp_path / "daemon.json"
    # the first mirror is down (nothing listens on port 9 here): the next one answers
    daemon_json.write_text(json.dumps({"registry-mirrors": ["http://127.0.0.1:9", url + "/"]}))
    done = registry_digest("docker.io/library/nginx:1.27", daemon_json)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == DIGEST
    assert asked == ["/v2/library/nginx/manifests/1.27"]


def test_a_model_the_volumes_patterns_leave_out_is_refused_before_any_host():
    spec = {
        "hf": "meta/llama",
        "revision": COMMIT,
        "ignore_patterns": ["original/", "*.pth"],
        "allow_patterns": "*.gguf",
    }
    data = {"inference_weight_volumes": {"llama": spec}}
    weights.check_volumes(data, "h")  # a glob or a list of globs, as snapshot_download takes them
    weights.check_model(0, "llama/llama-q4.gguf", data, "h")
    weights.check_model(0, "llama", data, "h")  # a directory (vLLM's model): what it holds is the hub's to list
    with pytest.raises(ConfigError, match=r"inference_services\[0\]\.model: llama/original/x.gguf: volume 'llama'"):
        weights.check_model(0, "llama/original/x.gguf", data, "h")
    with pytest.raises(ConfigError, match="leave 'model.safetensors' out of it"):
        weights.check_model(0, "llama/model.safetensors", data, "h")
