"""A connected site's host with no bundle (lab-net-1): its image pulled from the site's registry
(Debian's docker-registry, TLS with the lab CA, a login), one weight volume fetched from the site's
hub with huggingface_hub's client, one staged from a directory of the control node; both services
answer; what goes wrong is named, and nothing is half-applied."""

import hashlib
import json
import re

import pytest

from tests.lab import hosts as lab_hosts
from tests.lab import llamacpp, rag, site, vllm
from tests.lab.bundle import UNUSED_IMAGE

from . import conftest
from .conftest import REPO, run_deploy

HOST = "lab-net-1"
KEY = REPO / ".lab" / "secrets" / "chat-api-key"
MODEL = REPO / ".lab" / "models" / "tiny" / "tiny.gguf"


def sh(command, name=HOST, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


@pytest.fixture(scope="module")
def address(lab):
    return lab["lab-svc-1"]["address"]


def unit_digest():
    return sh("sha256sum /etc/systemd/system/gpufleet-chat.service").stdout.split()[0]


def container_id(service="chat"):
    return sh(f"docker inspect -f '{{{{.Id}}}}' gpufleet-{service}").stdout.strip()


def answers(port, name=HOST):
    key = KEY.read_text().strip()
    result = sh(
        f"curl -sf -H 'Authorization: Bearer {key}' http://127.0.0.1:{port}/v1/completions "
        '-d \'{"prompt": "hello", "max_tokens": 4}\'',
        name=name,
    )
    return result.returncode == 0 and json.loads(result.stdout)["usage"]["completion_tokens"] == 4


def test_no_bundle_reached_this_host(second_deploy):
    assert sh("test -e /var/lib/gpufleet/bundle").returncode == 1
    assert sh("test -e /etc/apt/sources.list.d/gpufleet-bundle.list").returncode == 1


def test_image_pulled_from_the_registry_with_its_digest_recorded(second_deploy, address):
    image = site.image(address)
    served = sh(f"/usr/local/lib/gpufleet/gpufleet-registry-digest {image}").stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", served)
    repo_digests = json.loads(sh(f"docker image inspect -f '{{{{json .RepoDigests}}}}' {image}").stdout)
    assert repo_digests == [f"{image.rsplit(':', 1)[0]}@{served}"]
    record = sh(f"cat /var/lib/gpufleet/images/{re.sub(r'[^A-Za-z0-9_.-]', '_', image)}.json").stdout
    assert json.loads(record) == repo_digests
    assert sh("docker info -f '{{json .RegistryConfig.Mirrors}}'").stdout.strip() == json.dumps(
        [f"https://{site.registry(address)}/"]
    )


def test_registry_login_is_root_only_and_its_password_in_no_command_line(second_deploy, address):
    config = sh("stat -c '%U %a' /root/.docker/config.json").stdout.strip()
    assert config == "root 600"
    password = site.LOGIN_FILE.read_text().strip().split(":", 1)[1]
    found = sh(
        "umask 077; p=$(mktemp); cat > $p; "
        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done | grep -F -c -f $p; "
        "journalctl --no-pager | grep -F -c -f $p; rm -f $p",
        input=password + "\n",
    ).stdout.split()
    assert found == ["0", "0"]
    assert (REPO / ".lab" / "secrets" / "registry-login").stat().st_mode & 0o077 == 0


def test_hub_volume_fetched_verified_and_read_only(second_deploy):
    listing = sh(
        "cd /srv/gpufleet/weights/hub-tiny && stat -c '%U %a %n' tiny.gguf config.json && "
        "sha256sum tiny.gguf && cat .gpufleet-hf.json"
    ).stdout.splitlines()
    assert listing[:2] == ["root 444 tiny.gguf", "root 444 config.json"]
    assert listing[2].split()[0] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert json.loads(listing[3]) == {"repo": site.HUB_REPO, "commit": site.hub_commit()}
    token = sh("stat -c '%U %a' /etc/gpufleet/secrets/hf-hub-tiny.token").stdout.strip()
    assert token == "root 600"


def test_directory_volume_staged_from_the_control_node(second_deploy):
    on_host = sh("sha256sum /srv/gpufleet/weights/dir-tiny/tiny.gguf").stdout.split()[0]
    assert on_host == hashlib.sha256(MODEL.read_bytes()).hexdigest()


@pytest.mark.parametrize("service, port", [("chat", 8080), ("chat-dir", 8081)])
def test_both_services_answer(second_deploy, service, port):
    assert sh(f"systemctl is-active gpufleet-{service}").stdout.strip() == "active"
    assert answers(port)


def test_damaged_hub_file_is_refused_then_fetched_again(second_deploy):
    sh(
        "f=/srv/gpufleet/weights/hub-tiny/tiny.gguf; chmod u+w $f && "
        "printf 'XXXX' | dd of=$f bs=1 seek=4096 conv=notrunc 2>/dev/null && chmod 444 $f"
    )
    sh("systemctl restart gpufleet-chat || true")
    journal = sh("journalctl --no-pager -u gpufleet-chat -n 20").stdout
    assert "/srv/gpufleet/weights/hub-tiny/tiny.gguf: SHA-256 differs from the manifest (corrupt)" in journal
    repaired = run_deploy("--limit", HOST)
    assert repaired.rc == 0, repaired.output[-3000:]
    assert "/srv/gpufleet/weights/hub-tiny: files changed since they were checked: fetching" in repaired.output
    assert (
        sh("sha256sum /srv/gpufleet/weights/hub-tiny/tiny.gguf").stdout.split()[0]
        == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    )
    assert answers(8080)
    again = run_deploy("--limit", HOST)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def _services_with(image=None, volumes=None, address=None):
    services = [
        {
            "name": "chat",
            "engine": "llamacpp",
            "image": image or site.image(address),
            "model": "hub-tiny/tiny.gguf",
            "port": 8080,
            "memory": "1g",
            "args": ["--ctx-size", "256", "--threads", "1"],
            "api_key_file": str(KEY),
        }
    ]
    data = ["--data", f"inference_services={json.dumps(services)}"]
    if volumes:
        data += ["--data", f"inference_weight_volumes={json.dumps(volumes)}"]
    return data


def test_wrong_digest_is_named_and_the_service_left_as_it_was(second_deploy, address):
    unit, running = unit_digest(), container_id()
    wrong = f"{site.image(address).rsplit(':', 1)[0]}@sha256:{'0' * 64}"
    result = run_deploy("--limit", HOST, *_services_with(image=wrong))
    assert result.rc != 0
    assert f"Pull image {wrong}" in result.output and "manifest unknown" in result.output, result.output[-3000:]
    assert unit_digest() == unit and container_id() == running and answers(8080)


def test_missing_revision_is_named_and_the_volume_left_as_it_was(second_deploy, address):
    unit, running = unit_digest(), container_id()
    volumes = {"hub-tiny": {"hf": site.HUB_REPO, "revision": "f" * 40, "token_file": str(site.HUB_TOKEN_FILE)}}
    result = run_deploy("--limit", HOST, *_services_with(volumes=volumes, address=address))
    assert result.rc != 0
    assert (
        f"gpufleet-hf-fetch: {site.HUB_REPO}@{'f' * 40} at {site.hub_endpoint(address)}: no such revision"
        in result.output
    ), result.output[-3000:]
    assert json.loads(sh("cat /srv/gpufleet/weights/hub-tiny/.gpufleet-hf.json").stdout)["commit"] == site.hub_commit()
    assert unit_digest() == unit and container_id() == running and answers(8080)


def host_state():
    """What a refused run must leave as it was on lab-net-1 (conftest.host_state)."""
    return conftest.host_state({"name": HOST})


def test_branch_revision_is_refused_before_any_host_changes(second_deploy, address):
    before = host_state()
    volumes = {"hub-tiny": {"hf": site.HUB_REPO, "revision": "main", "token_file": str(site.HUB_TOKEN_FILE)}}
    result = run_deploy("--limit", HOST, *_services_with(volumes=volumes, address=address))
    assert result.rc != 0
    assert (
        "lab-net-1: inference_weight_volumes['hub-tiny']: revision: 'main' is a branch or tag, which moves"
        in result.output
    ), result.output[-2000:]
    assert "Starting operation" not in result.output
    assert host_state() == before


def test_login_file_readable_by_others_is_refused_before_any_host(second_deploy, address, tmp_path):
    before = host_state()
    login = tmp_path / "login"
    login.write_text("gpufleet-lab:whatever\n")
    login.chmod(0o644)
    result = run_deploy(
        "--limit", HOST, "--data", f"docker_registry_logins={json.dumps({site.registry(address): str(login)})}"
    )
    assert result.rc != 0
    assert f"{login}: readable by others than its owner (mode 644); chmod 600" in result.output
    assert "Starting operation" not in result.output
    assert host_state() == before


def test_moved_tag_is_reported_and_followed_only_when_asked(second_deploy, address):
    image = site.image(address)
    before = sh(f"docker image inspect -f '{{{{.Id}}}}' {image}").stdout.strip()
    running = container_id()
    moved = site.push_variant(address)
    try:
        kept = run_deploy("--limit", HOST)
        assert kept.rc == 0 and kept.total_changed() == 0, kept.changed()
        assert f"{image}: its registry now serves {moved} for this tag; this host keeps" in kept.output
        assert container_id() == running
        followed = run_deploy("--limit", HOST, "--data", "inference_image_follow_tag=True")
        assert followed.rc == 0, followed.output[-3000:]
        assert "following the tag from" in followed.output
        assert sh(f"docker image inspect -f '{{{{.Id}}}}' {image}").stdout.strip() != before
        assert container_id() != running and answers(8080)  # restarted onto the new image, and serving
        assert container_id("chat-dir") and answers(8081)
    finally:
        site.push_image(address, log=lambda *_: None)
        back = run_deploy("--limit", HOST, "--data", "inference_image_follow_tag=True")
    assert back.rc == 0, back.output[-3000:]
    assert sh(f"docker image inspect -f '{{{{.Id}}}}' {image}").stdout.strip() == before


def test_unreachable_registry_keeps_what_the_host_has_and_names_itself_for_what_it_lacks(second_deploy, address):
    sh("systemctl stop docker-registry", name="lab-svc-1")
    try:
        kept = run_deploy("--limit", HOST)
        assert kept.rc == 0 and kept.total_changed() == 0, kept.changed()
        assert "could not ask its registry for the tag's digest" in kept.output
        absent = f"{site.registry(address)}/gpufleet-lab/not-here:1"
        unit = unit_digest()
        failed = run_deploy("--limit", HOST, *_services_with(image=absent))
        assert failed.rc != 0
        assert f"Pull image {absent}" in failed.output and site.registry(address) in failed.output
        assert unit_digest() == unit and answers(8080)
    finally:
        sh("systemctl start docker-registry", name="lab-svc-1")


def test_bundle_hosts_get_only_what_their_services_use(second_deploy, lab):
    """The lab bundle also carries volumes and images no default lab service uses (one unused, the vLLM
    test's 3 GB image and model, the RAG test's images and model): no host gets them."""
    manifest = json.loads((REPO / ".lab" / "bundle" / "manifest.json").read_text())
    images = {image["name"]: image["file"].split("/")[-1] for image in manifest["images"]}
    assert sorted(manifest["weights"]) == ["gemma", "tiny", "tiny-hf", "unused"]
    unused_here = [UNUSED_IMAGE, vllm.image_tag(), *(rag.image_tag(name) for name in rag.IMAGES)]
    assert all(tag in images for tag in unused_here)
    for name in ("lab-1", "lab-gap-1"):
        assert sh("ls /srv/gpufleet/weights", name=name).stdout.split() == ["tiny"], name
        assert sh("ls /var/lib/gpufleet/bundle/images", name=name).stdout.split() == [images[llamacpp.image_tag()]]
        repositories = sh("docker images --format '{{.Repository}}'", name=name).stdout.split()
        assert not {tag.split(":")[0] for tag in unused_here} & set(repositories)


def test_a_host_of_the_site_gets_image_and_hub_weights_from_the_seed_not_the_registry_or_hub(
    second_deploy, address, lab
):
    """lab-ubu-1 stages from lab-net-1 and runs its two services (GPUFLEET_LAB_SITE_FETCH): lab-net-1
    keeps a `docker save` archive of the image it pulled; lab-ubu-1, which has neither the registry's
    login nor its CA (a pull from it would fail) nor the hub's address, pulls that archive and the hub
    volume as lab-net-1 fetched it over the site's relay, loads the image as the seed's ID, and both
    services serve. Neither the registry's nor the hub's access log has a request from lab-ubu-1.
    Then zero changes; the default run takes the services off lab-ubu-1 again."""
    image = site.image(address)
    pair = ("--limit", HOST, "--limit", "lab-ubu-1")
    env = {"GPUFLEET_LAB_SITE_FETCH": "lab-ubu-1"}
    ubu = "lab-ubu-1"
    ubu_address, lab_address = lab[ubu]["address"], lab[HOST]["address"]  # on the lab network
    sh(f"docker rmi -f {image} >/dev/null 2>&1; rm -rf /var/lib/gpufleet/site-images /srv/gpufleet/weights/*", name=ubu)
    assert sh(f"docker image inspect {image}", name=ubu).returncode != 0
    sh("rm -rf /var/lib/gpufleet/site-images")  # the seed saves its archive in this run
    since = "@" + sh("date +%s", name="lab-svc-1").stdout.strip()  # journalctl --since @EPOCH
    try:
        first = run_deploy(*pair, env=env)
        assert first.rc == 0, first.output[-4000:]
        assert re.search(
            rf"\[{HOST}\] {re.escape(image)}: saved for the site's hosts \(\S+\.tar, \d+ bytes\)", first.output
        )
        assert f"[{ubu}] {image}: loaded from {HOST}'s archive" in first.output, first.output[-3000:]
        for into in ("/var/lib/gpufleet/site-images", "/srv/gpufleet/weights/hub-tiny"):
            assert re.search(rf"\[{ubu}\] relayed \d+ file\(s\), \d+ bytes, from {HOST} into {into}\n", first.output), (
                into
            )
        seed_id = sh(f"docker image inspect -f '{{{{.Id}}}}' {image}").stdout.strip()
        assert sh(f"docker image inspect -f '{{{{.Id}}}}' {image}", name=ubu).stdout.strip() == seed_id
        assert sh("ls -A /var/lib/gpufleet/site-images | grep -v gpufleet-staged", name=ubu).stdout.strip() == ""
        tree = "cd /srv/gpufleet/weights/hub-tiny && find . -type f ! -path './.cache/*' ! -name .gpufleet-staged.json | sort | xargs sha256sum"
        assert sh(tree, name=ubu).stdout == sh(tree).stdout  # the same files, the source record too
        assert sh("test -e /etc/gpufleet/secrets/hf-hub-tiny.token", name=ubu).returncode == 1  # no hub token there
        assert answers(8080, name=ubu) and answers(8081, name=ubu)
        # the registry's and the hub's access logs (a line per request, the client's address first): none
        # from lab-ubu-1 since the run began; lab-net-1's are there (its tag check in this run; its
        # first fetch from the hub, earlier), so the logs are read right
        for unit, control_since in (("docker-registry", since), ("gpufleet-lab-hub", "@0")):
            log = sh(f"journalctl -u {unit} --since {since} --no-pager -o cat", name="lab-svc-1").stdout.splitlines()
            assert not [line for line in log if line.startswith(f"{ubu_address} ")], (unit, log[-20:])
            control = sh(f"journalctl -u {unit} --since {control_since} --no-pager -o cat", name="lab-svc-1").stdout
            assert [line for line in control.splitlines() if line.startswith(f"{lab_address} ")], (
                unit,
                control[-2000:],
            )
        again = run_deploy(*pair, env=env)
        assert again.rc == 0 and again.total_changed() == 0, again.changed()
    finally:
        back = run_deploy(*pair)
    assert back.rc == 0, back.output[-3000:]
    assert sh("systemctl is-active gpufleet-chat", name=ubu).stdout.strip() != "active"
