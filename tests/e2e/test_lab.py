"""The lab itself: hosts booted by systemd, reachable over SSH, one of them with no way out."""

import re
import subprocess

from tests.lab import hosts as lab_hosts
from tests.lab import image


def test_hosts_booted_by_systemd(lab, lab_host):
    for name in lab:
        state = lab_host(name).run("systemctl is-system-running").stdout.strip()
        assert state in ("running", "degraded"), f"{name}: {state}"


def test_ssh_published_on_loopback_only(lab):
    for host in lab.values():
        bindings = lab_hosts.docker("port", host["container"], "22/tcp").splitlines()
        assert bindings and all(b.startswith("127.0.0.1:") for b in bindings), bindings


def test_hosts_have_distinct_machine_ids_and_host_keys(lab, lab_host):
    ids = {lab_host(n).file("/etc/machine-id").content_string.strip() for n in lab}
    keys = {lab_host(n).check_output("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub") for n in lab}
    assert len(ids) == len(lab) and len(keys) == len(lab)


def test_image_cached_under_its_content_key(lab):
    assert (image.CACHE_DIR / "images" / f"lab-host-{image.image_key()}.tar.zst").stat().st_size > 10_000_000
    assert lab_hosts.docker("image", "inspect", "-f", "{{.Id}}", image.image_tag())


def test_connected_host_reaches_the_debian_mirror(lab, lab_host):
    result = lab_host("lab-2").run("timeout 60 apt-get -o Acquire::Retries=0 update")
    assert result.rc == 0, result.stderr


def test_airgapped_host_cannot_get_out(lab, lab_host):
    gap = lab_host("lab-gap-1")
    result = gap.run("timeout 20 apt-get -o Acquire::Retries=0 -o Acquire::http::Timeout=5 update 2>&1")
    # Only local sources (the staged bundle, once deployed) may answer; no network source does.
    assert not re.search(r"^(Hit|Get):\d+ https?://", result.stdout, re.M), result.stdout
    assert result.rc != 0 or "Failed to fetch" in result.stdout or "W: " in result.stdout, result.stdout
    # Lab hosts on the other network are as unreachable as the outside: sshd on lab-1 is not.
    probe = f"timeout 5 bash -c '</dev/tcp/{lab['lab-1']['address']}/22'"
    assert gap.run(probe).rc != 0
    assert lab_host("lab-2").run(probe).rc == 0  # the same probe works from a connected host


def test_control_node_still_reaches_airgapped_host_over_ssh(lab):
    result = lab_hosts.ssh(lab["lab-gap-1"], "hostname")
    assert result.stdout.strip() == "lab-gap-1"


def test_docker_runs_a_locally_imported_image_inside_a_lab_host(first_deploy, lab_host):
    host = lab_host("lab-1")
    build = host.run(
        "set -e; rm -rf /tmp/bb; mkdir -p /tmp/bb/bin; cp /bin/busybox /tmp/bb/bin/; "
        "tar -C /tmp/bb -c . | docker import - gpufleet/busybox:lab >/dev/null"
    )
    assert build.rc == 0, build.stderr
    run = host.run("docker run --rm gpufleet/busybox:lab /bin/busybox echo inner-container-ok")
    assert run.stdout.strip() == "inner-container-ok", run.stderr


def test_image_loaded_from_control_node_without_registry(first_deploy, lab):
    """docker save here | ssh host docker load: the way images travel with no registry."""
    tag = image.image_tag()
    save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
    load = subprocess.run(
        ["ssh", "-F", str(lab_hosts.SSH_CONFIG), "lab-2", "docker load"],
        stdin=save.stdout,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert save.wait() == 0 and load.returncode == 0, load.stderr
    assert tag in load.stdout
    listed = lab_hosts.ssh(lab["lab-2"], f"docker image inspect -f '{{{{.Id}}}}' {tag}")
    assert listed.stdout.startswith("sha256:")
