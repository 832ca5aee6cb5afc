"""Build the lab host image: debootstrap + ``docker import``, cached by content key."""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("GPUFLEET_LAB_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("GPUFLEET_LAB_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "sudo",
    "iproute2",
    "ca-certificates",
    "curl",
    "procps",
    "kmod",
    "busybox-static",
    "gnupg",
]
CACHE_DIR = Path(os.environ.get("GPUFLEET_LAB_CACHE", Path.home() / ".cache" / "gpufleet"))

# Run inside the debootstrapped root file system (chroot) before it is imported.
CHROOT_SETUP = r"""
set -e
cat > /etc/apt/sources.list <<SRC
deb {mirror} {suite} main
deb {mirror} {suite}-updates main
deb {security} {suite}-security main
SRC
# Every host gets its own machine-id (systemd writes one at boot) and its own SSH host keys.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id && ln -s /etc/machine-id /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*
cat > /etc/systemd/system/lab-ssh-hostkeys.service <<UNIT
[Unit]
Description=Generate this lab host's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/lab-ssh-hostkeys.service /etc/systemd/system/multi-user.target.wants/
# Units that cannot work in a container only make the boot "degraded".
for unit in systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount \
            systemd-modules-load.service getty@tty1.service; do
  ln -sf /dev/null /etc/systemd/system/$unit
done
mkdir -p /root/.ssh && chmod 700 /root/.ssh
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""


def recipe():
    """Everything the image depends on; its hash is the cache key."""
    return {
        "suite": SUITE,
        "mirror": MIRROR,
        "security": SECURITY_MIRROR,
        "packages": PACKAGES,
        "setup": CHROOT_SETUP,
        "format": 1,
    }


def recipe_key(recipe_dict, length=16):
    """A cache key: the hash of everything a build depends on."""
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest()[:length]


def image_key():
    return recipe_key(recipe())


def tarball_path():
    """The cached root file system tarball the host image is imported from."""
    return CACHE_DIR / "images" / f"lab-host-{image_key()}.tar.zst"


def image_tag():
    return f"gpufleet-lab-host:{image_key()}"


def docker_has_image(tag):
    return (
        subprocess.run(
            ["docker", "image", "inspect", tag],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )


def _import(tarball, tag):
    with open(tarball, "rb") as fh:
        zstd = subprocess.Popen(["zstd", "-dc"], stdin=fh, stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "--change", 'CMD ["/sbin/init"]', "--change", "ENV container=docker", "-", tag],
            stdin=zstd.stdout,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        if zstd.wait() != 0:
            raise RuntimeError(f"{tarball}: zstd failed; delete it and build again")


def _debootstrap(tarball, log):
    root = Path(tempfile.mkdtemp(prefix="gpufleet-rootfs-"))
    try:
        log(f"debootstrap {SUITE} into {root} (about a minute)")
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE, str(root), MIRROR],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        setup = CHROOT_SETUP.format(mirror=MIRROR, security=SECURITY_MIRROR, suite=SUITE)
        subprocess.run(["chroot", str(root), "/bin/sh", "-c", setup], check=True)
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        with open(partial, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(["zstd", "-q", "-T0", "-3"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait() != 0:
                raise RuntimeError("tar of the root file system failed")
        partial.rename(tarball)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ensure_image(log=print):
    """Return the host image tag, building or importing it only when needed."""
    tag = image_tag()
    if docker_has_image(tag):
        log(f"image {tag}: present")
        return tag
    tarball = tarball_path()
    if not tarball.exists():
        _debootstrap(tarball, log)
    log(f"image {tag}: importing {tarball}")
    _import(tarball, tag)
    return tag


def commit_and_save(container, tag, changes, archive):
    """Commit ``container`` as ``tag`` with Dockerfile-like ``changes`` and save it as ``archive``
    (written whole or not at all)."""
    flags = [arg for change in changes for arg in ("--change", change)]
    subprocess.run(["docker", "commit", *flags, container, tag], check=True, stdout=subprocess.DEVNULL)
    archive.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["docker", "save", "-o", str(archive.with_suffix(".partial")), tag], check=True)
    archive.with_suffix(".partial").rename(archive)


def ensure_archived(tag, archive, build, log=print):
    """Return (tag, archive): an image built here in this machine's Docker and as a ``docker save``
    archive, loaded from the archive, saved from Docker, or ``build(archive, tag, log)`` when neither has it."""
    present = docker_has_image(tag)
    if archive.exists() and not present:
        subprocess.run(["docker", "load", "-q", "-i", str(archive)], check=True, stdout=subprocess.DEVNULL)
    elif not archive.exists():
        if present:
            subprocess.run(["docker", "save", "-o", str(archive), tag], check=True)
        else:
            build(archive, tag, log)
    log(f"image {tag}: {archive}")
    return tag, archive
