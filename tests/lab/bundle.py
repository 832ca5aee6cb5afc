"""The lab's offline bundle: Debian's Docker and NVIDIA driver packages with their dependencies,
the toolkit test doubles, the llama.cpp server image and a tiny GGUF, built with
``python -m operations.offline.bundle``'s builder into .lab/bundle (reused when intact). It also carries a
weight volume and an image that no lab service uses: a host gets only what its services use."""

import subprocess
from pathlib import Path

import yaml

from operations.core import settings
from operations.driver import install as nvidia_driver
from operations.driver import plan as driver_plan
from operations.offline.bundle import builder
from operations.toolkit import install as nvidia_toolkit

from . import image, llamacpp, models

ROOT = Path(__file__).resolve().parent.parent.parent
LAB = ROOT / ".lab"
BUNDLE = LAB / "bundle"
DRIVER_VERSION = settings.DEFAULTS["nvidia_driver_version"]
UNUSED_IMAGE = "gpufleet-lab/unused:1"
TOOLKIT_VERSION = settings.DEFAULTS["nvidia_toolkit_version"]


def _baseline_status():
    """The lab host image's dpkg status: the bundle need not carry what every host already has."""
    status = LAB / "baseline-status"
    tarball = image.tarball_path()
    if not status.exists() or status.stat().st_mtime < tarball.stat().st_mtime:
        zstd = subprocess.Popen(["zstd", "-dc", str(tarball)], stdout=subprocess.PIPE)
        data = subprocess.run(
            ["tar", "-xO", "./var/lib/dpkg/status"], stdin=zstd.stdout, capture_output=True, check=True
        ).stdout
        zstd.wait()
        status.write_bytes(data)
    return status


def spec(image_tag, driver_version=DRIVER_VERSION):
    return {
        "apt": {
            "target": {
                "distro": "debian",
                "release": image.SUITE,
                "arch": "amd64",
                "mirror": image.MIRROR,
                "security_mirror": image.SECURITY_MIRROR,
                "components": ["main", "contrib", "non-free", "non-free-firmware"],
            },
            "packages": [
                "docker.io",
                *driver_plan.debian(driver_version, "unused").packages,
                "nvidia-persistenced",
                *nvidia_toolkit.PACKAGES,
            ],
            "pins": [
                {"packages": nvidia_driver.PIN_PATTERNS, "version": driver_version},
                {"packages": nvidia_toolkit.PACKAGES, "version": TOOLKIT_VERSION},
            ],
            "debs": ["toolkit-repo/*.deb"],
            "baseline_status": str(_baseline_status()),
        },
        "images": [image_tag, UNUSED_IMAGE],
        "weights": {"tiny": {"from": "models/tiny"}, "unused": {"from": "models/unused"}},
    }


def _unused():
    """A one-file image and a one-file volume that no lab service uses (byte-stable)."""
    unused = LAB / "models" / "unused" / "unused.bin"
    if not unused.exists():
        unused.parent.mkdir(parents=True, exist_ok=True)
        unused.write_bytes(b"gpufleet lab: a weight volume no service uses\n")
    if not image.docker_has_image(UNUSED_IMAGE):
        tar = subprocess.run(
            ["tar", "-C", str(unused.parent), "--mtime=@0", "--owner=0", "--group=0", "-c", "unused.bin"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["docker", "import", "-", UNUSED_IMAGE], input=tar, check=True, capture_output=True)


def build(log=print, driver_version=DRIVER_VERSION, out=BUNDLE):
    """Build or refresh the lab's bundle (.lab/bundle; another driver version: give another ``out``);
    returns its path."""
    tag, _ = llamacpp.ensure_image(log=log)
    model = LAB / "models" / "tiny" / "tiny.gguf"
    if not model.exists():
        models.write_tiny_gguf(model)
    _unused()
    spec_path = LAB / f"{out.name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tag, driver_version), sort_keys=False))
    builder.build(spec_path, out, log=log)
    return out
