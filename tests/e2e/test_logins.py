"""Logins as real fleets have them: lab-1 and lab-gap-1 are reached as the sudo user ``gpufleet``
with root's SSH login off (the whole stack is deployed through it: see test_deploy), a password
sudo works through ``_sudo_password``, and a login that cannot become root is refused before any
host changes."""

import json
import re
import subprocess

import pytest

from tests.lab import hosts as lab_hosts

from .conftest import REPO, run_deploy

BUNDLE = REPO / ".lab" / "bundle"


def sh(name, command, **kwargs):
    return lab_hosts.ssh({"name": name}, command, check=False, **kwargs)


@pytest.mark.parametrize("name", lab_hosts.SUDO_HOSTS)
def test_root_cannot_log_in_and_the_sudo_user_deployed_everything(second_deploy, lab, name):
    assert lab[name]["user"] == lab_hosts.SUDO_USER
    as_root = subprocess.run(
        ["ssh", "-F", str(lab_hosts.SSH_CONFIG), "-o", "BatchMode=yes", "-l", "root", name, "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert as_root.returncode == 255 and "Permission denied" in as_root.stderr, as_root.stderr
    assert sh(name, "sshd -T | grep -i '^permitrootlogin'").stdout.strip() == "permitrootlogin no"
    # The deploy went through sudo: the service it installed runs from what it staged as root-owned files.
    record = json.loads(sh(name, "cat /etc/gpufleet/host.json").stdout)
    assert [s["name"] for s in record["services"]] == ["chat"]
    assert sh(
        name,
        "stat -c '%U %a' /etc/gpufleet/secrets/chat.key /srv/gpufleet/weights/tiny/tiny.gguf"
        " /srv/gpufleet/weights/tiny/.gpufleet-staged.json",
    ).stdout.split("\n")[:3] == ["gpufleet-chat 400", "root 444", "root 644"]
    assert sh(name, "systemctl is-active gpufleet-chat").stdout.strip() == "active"


def _refused(result, message):
    assert result.rc != 0, result.output[-2000:]
    assert message in result.output, result.output[-3000:]
    assert "Starting operation" not in result.output


def test_login_without_sudo_is_refused_before_any_host_changes(second_deploy, lab):
    before = sh("lab-2", "stat -c %Y /etc/gpufleet/host.json").stdout
    uid = sh("lab-2", f"id -u {lab_hosts.NO_SUDO_USER}").stdout.strip()
    without = run_deploy("--limit", "lab-2", "--data", f"ssh_user={lab_hosts.NO_SUDO_USER}")
    _refused(
        without,
        f"lab-2: _sudo: logs in as nosudo (uid {uid}), not root, and no privilege wrapper is set: set `_sudo = True`",
    )
    with_sudo = run_deploy("--limit", "lab-2", "--data", f"ssh_user={lab_hosts.NO_SUDO_USER}", "--data", "_sudo=True")
    _refused(
        with_sudo,
        f"lab-2: _sudo: logs in as nosudo (uid {uid}); tried `sudo -n true`: sudo: a password is "
        "required. Give nosudo passwordless sudo, or set `_sudo_password`",
    )
    assert sh("lab-2", "stat -c %Y /etc/gpufleet/host.json").stdout == before


def test_password_sudo_without_or_with_a_wrong_password_is_refused(second_deploy):
    login = ("--limit", "lab-2", "--data", f"ssh_user={lab_hosts.PASSWORD_SUDO_USER}", "--data", "_sudo=True")
    _refused(run_deploy(*login), "lab-2: _sudo: logs in as gpufleet-pw")
    wrong = run_deploy(*login, "--data", "_sudo_password=not-the-password")
    _refused(wrong, "lab-2: _sudo: logs in as gpufleet-pw")
    assert "it did not run as root" in wrong.output and "not-the-password" not in wrong.output


def test_password_sudo_restages_and_rewrites_secrets(second_deploy, lab):
    """A login whose sudo asks for its password: staging stream, record and secret go through it."""
    login = (
        "--limit",
        "lab-2",
        "--data",
        f"ssh_user={lab_hosts.PASSWORD_SUDO_USER}",
        "--data",
        "_sudo=True",
        "--data",
        f"_sudo_password={lab_hosts.sudo_password()}",
    )
    sh("lab-2", "rm -f /srv/gpufleet/weights/tiny/tiny.gguf /etc/gpufleet/secrets/chat.key")
    repaired = run_deploy(*login)
    assert repaired.rc == 0, repaired.output[-3000:]
    assert re.search(
        r"\[lab-2\] staged 1 file\(s\), \d+ bytes sent through pyinfra's connection, into /srv/gpufleet/weights/tiny",
        repaired.output,
    )
    assert lab_hosts.sudo_password() not in repaired.output
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert (
        sh("lab-2", "sha256sum /srv/gpufleet/weights/tiny/tiny.gguf").stdout.split()[0]
        == manifest["files"]["weights/tiny/tiny.gguf"]["sha256"]
    )
    assert (
        sh("lab-2", "stat -c '%U %G %a' /etc/gpufleet/secrets/chat.key").stdout.strip()
        == "gpufleet-chat gpufleet-chat 400"
    )
    again = run_deploy(*login)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()
