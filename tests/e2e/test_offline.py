"""The offline bundle: the air-gapped host converges from it alone; staging resumes, verifies and
skips; a bundle that does not match its manifest is refused before any host is touched."""

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.lab import hosts as lab_hosts
from tests.lab import llamacpp

from .conftest import REPO, run_deploy

BUNDLE = REPO / ".lab" / "bundle"


def sh(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False)


def _link_or_copy(source, target):
    """Large files hard-linked (the bundle's 6 GB are not copied), small ones (the manifest, the
    verification record a run rewrites) copied."""
    if os.path.getsize(source) > 1 << 20:
        try:
            return os.link(source, target)
        except OSError:
            pass
    return shutil.copy2(source, target)


def copy_of_bundle(dest):
    shutil.copytree(BUNDLE, dest, symlinks=True, copy_function=_link_or_copy)
    return dest


def test_airgapped_host_installed_everything_from_the_bundle(second_deploy):
    # (tests/e2e/test_lab.py proves this host reaches nothing outside the lab.)
    installed = sh(
        "lab-gap-1", "dpkg-query -W -f '${Package} ${Version}\\n' docker.io nvidia-smi nvidia-container-toolkit"
    ).stdout
    assert re.search(r"^nvidia-smi 535\.261\.03-", installed, re.M)
    assert re.search(r"^nvidia-container-toolkit 1\.17\.8-1", installed, re.M)
    assert re.search(r"^docker\.io ", installed, re.M)
    policy = sh("lab-gap-1", "apt-cache policy docker.io").stdout
    assert "file:/var/lib/gpufleet/bundle/apt ./" in policy
    assert sh("lab-gap-1", "systemctl is-active gpufleet-chat").stdout.strip() == "active"


@pytest.mark.parametrize("name", ["lab-1", "lab-2"])  # through the sudo login, and as root
def test_interrupted_transfer_resumes_with_only_the_rest_sent(second_deploy, name):
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    image = manifest["images"][0]["file"]
    size = manifest["files"][image]["size"]
    remote = f"/var/lib/gpufleet/bundle/{image}"
    half = size // 2
    # What a copy killed half-way leaves: the first half in the partial file, no final file.
    sh(name, f"head -c {half} {remote} > {remote}.gpufleet-part && rm -f {remote}")
    resumed = run_deploy("--limit", name)
    assert resumed.rc == 0, resumed.output[-3000:]
    sent = re.search(
        r"staged 1 file\(s\), (\d+) bytes sent through the OpenSSH client, into /var/lib/gpufleet/bundle/images",
        resumed.output,
    )
    assert sent and int(sent.group(1)) == size - half
    assert sh(name, f"sha256sum {remote}").stdout.split()[0] == manifest["files"][image]["sha256"]
    assert sh(name, f"stat -c '%U %a' {remote}").stdout.strip() == "root 444"
    again = run_deploy("--limit", name)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_second_run_sends_and_hashes_nothing(second_deploy):
    # Intact files are known by size and mtime: no staging step runs, nothing is read or sent.
    staging = {name: row for name, row in second_deploy.results().items() if "Stage " in name}
    assert len(staging) >= 3 and all(row[1] == 0 and row[3] == row[0] for row in staging.values()), staging
    assert "to verify" not in second_deploy.output and "bytes sent" not in second_deploy.output


def test_bundle_not_matching_its_manifest_is_refused_before_any_host(second_deploy, tmp_path):
    """A file changed after the bundle's last check is hashed again and refused (the record of that
    check, kept here, vouches only for files whose size and mtime it saw)."""
    bad = copy_of_bundle(tmp_path / "bundle")
    manifest = json.loads((bad / "manifest.json").read_text())
    assert (bad / ".gpufleet-verified.json").exists()
    victim = sorted(p for p in manifest["files"] if p.startswith("weights/"))[0]
    (bad / victim).unlink()  # a copy of its own: the lab's bundle keeps its file
    shutil.copy2(BUNDLE / victim, bad / victim)
    with open(bad / victim, "r+b") as handle:
        handle.seek(100)
        handle.write(b"corrupt!")
    before = sh("lab-1", "stat -c %Y /etc/gpufleet/host.json").stdout
    result = run_deploy("--data", f"gpufleet_bundle={bad}")
    assert result.rc != 0
    assert f"gpufleet_bundle: {bad}: {victim}: SHA-256 differs from the manifest (corrupt)" in result.output
    assert "Starting operation" not in result.output
    assert sh("lab-1", "stat -c %Y /etc/gpufleet/host.json").stdout == before


def test_malformed_manifest_is_refused(second_deploy, tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": 1, "files": {"../etc/passwd": {"size": 1}}}')
    result = run_deploy("--data", f"gpufleet_bundle={tmp_path}")
    assert result.rc != 0
    assert "../etc/passwd: paths must stay inside the bundle" in result.output


# lab-1 logs in as the sudo user gpufleet, lab-2 as root: each direction once.
@pytest.mark.parametrize("seed, puller", [("lab-1", "lab-2"), ("lab-2", "lab-1")])
def test_host_pulls_from_a_seed_of_the_site_not_the_control_node(second_deploy, lab, seed, puller):
    relay = ("--limit", seed, "--limit", puller, "--data", f"gpufleet_stage_via={seed}")
    # Neither host has the files: the seed stages them from the control node, then the other pulls from it.
    for name in (seed, puller):
        sh(name, "rm -rf /srv/gpufleet/weights/tiny /var/lib/gpufleet/bundle/images")
    first = run_deploy(*relay)
    assert first.rc == 0, first.output[-3000:]
    seeded = re.findall(
        rf"\[{seed}\] staged \d+ file\(s\), \d+ bytes sent through the OpenSSH client, into (\S+)", first.output
    )
    assert set(seeded) == {"/srv/gpufleet/weights/tiny", "/var/lib/gpufleet/bundle/images"}
    pulled = re.findall(rf"\[{puller}\] relayed \d+ file\(s\), (\d+) bytes, from {seed} into (\S+)", first.output)
    assert {dest for _, dest in pulled} == {"/srv/gpufleet/weights/tiny", "/var/lib/gpufleet/bundle/images"}
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    used = {image["file"] for image in manifest["images"] if image["name"] == llamacpp.image_tag()}
    assert sum(int(size) for size, _ in pulled) == sum(
        entry["size"] for path, entry in manifest["files"].items() if path.startswith("weights/tiny/") or path in used
    )
    assert f"[{puller}] staged" not in first.output  # nothing came from the control node
    for path, entry in manifest["files"].items():
        if path.startswith("weights/tiny/"):
            on_host = sh(puller, f"sha256sum /srv/gpufleet/weights/{path[len('weights/') :]}").stdout.split()[0]
            assert on_host == entry["sha256"], path
    # The one-run key is gone from both ends: the seed login's authorized_keys, the puller's key directory.
    login = lab[seed]["user"]
    home = "/root" if login == "root" else f"/home/{login}"
    assert "gpufleet-relay" not in sh(seed, f"cat {home}/.ssh/authorized_keys").stdout
    assert sh(puller, "ls -A /var/lib/gpufleet/relay").stdout.strip() == ""
    assert sh(puller, "stat -c '%U %a' /var/lib/gpufleet/relay").stdout.strip() == "root 700"
    assert sh(puller, "systemctl is-active gpufleet-chat").stdout.strip() == "active"
    again = run_deploy(*relay)
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_seed_outside_the_run_is_refused(second_deploy):
    result = run_deploy("--limit", "lab-2", "--data", "gpufleet_stage_via=lab-1")
    assert result.rc != 0
    assert "lab-2: gpufleet_stage_via: lab-1 is not in this run (--limit?)" in result.output


def test_bundle_signature_is_required_when_signers_are_named(second_deploy, tmp_path):
    key = tmp_path / "ops"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    signers = tmp_path / "allowed_signers"
    signers.write_text(f'ops@site namespaces="gpufleet-bundle" {(tmp_path / "ops.pub").read_text()}')
    before = sh("lab-1", "stat -c %Y /etc/gpufleet/host.json").stdout
    unsigned = run_deploy("--limit", "lab-1", "--data", f"gpufleet_bundle_signers={signers}")
    assert unsigned.rc != 0
    assert "manifest.json.sig: missing, and gpufleet_bundle_signers asks for a signed bundle" in unsigned.output
    assert "Starting operation" not in unsigned.output
    assert sh("lab-1", "stat -c %Y /etc/gpufleet/host.json").stdout == before
    # The same bundle, signed by the named key: accepted, and the converged host stays as it is.
    copy = copy_of_bundle(tmp_path / "bundle")
    subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", "gpufleet-bundle", str(copy / "manifest.json")],
        check=True,
    )
    signed = run_deploy(
        "--limit", "lab-1", "--data", f"gpufleet_bundle={copy}", "--data", f"gpufleet_bundle_signers={signers}"
    )
    assert signed.rc == 0 and signed.total_changed() == 0, (signed.changed(), signed.output[-2000:])
