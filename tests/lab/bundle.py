"""The lab's offline bundle: Debian's Docker and NVIDIA driver packages with their dependencies,
the toolkit test doubles, the llama.cpp server image and a tiny GGUF, built with
``python -m operations.bundle``'s builder into .lab/bundle (reused when intact)."""

import subprocess
from pathlib import Path

import yaml

from operations import bundle, nvidia_driver, nvidia_toolkit

from . import image, llamacpp, models

ROOT = Path(__file__).resolve().parent.parent.parent
LAB = ROOT / ".lab"
BUNDLE = LAB / "bundle"
DRIVER_VERSION = nvidia_driver.DEFAULTS["nvidia_driver_version"]
TOOLKIT_VERSION = nvidia_toolkit.DEFAULTS["nvidia_toolkit_version"]


def _baseline_status():
    """The lab host image's dpkg status: the bundle need not carry what every host already has."""
    status = LAB / "baseline-status"
    tarball = image.tarball_path()
    if not status.exists() or status.stat().st_mtime < tarball.stat().st_mtime:
        zstd = subprocess.Popen(["zstd", "-dc", str(tarball)], stdout=subprocess.PIPE)
        data = subprocess.run(["tar", "-xO", "./var/lib/dpkg/status"], stdin=zstd.stdout, capture_output=True,
                              check=True).stdout
        zstd.wait()
        status.write_bytes(data)
    return status


def spec(image_tag):
    return {
        "apt": {
            "target": {"distro": "debian", "release": image.SUITE, "arch": "amd64", "mirror": image.MIRROR,
                       "security_mirror": image.SECURITY_MIRROR,
                       "components": ["main", "contrib", "non-free", "non-free-firmware"]},
            "packages": ["docker.io", *nvidia_driver.driver_packages("bundle", "Debian", DRIVER_VERSION),
                         "nvidia-persistenced", *nvidia_toolkit.PACKAGES],
            "pins": [{"packages": nvidia_driver.PIN_PATTERNS, "version": DRIVER_VERSION},
                     {"packages": nvidia_toolkit.PACKAGES, "version": TOOLKIT_VERSION}],
            "debs": ["toolkit-repo/*.deb"],
            "baseline_status": str(_baseline_status()),
        },
        "images": [image_tag],
        "weights": {"tiny": {"from": "models/tiny"}},
    }


def build(log=print):
    """Build or refresh .lab/bundle; returns its path."""
    tag, _ = llamacpp.ensure_image(log=log)
    model = LAB / "models" / "tiny" / "tiny.gguf"
    if not model.exists():
        models.write_tiny_gguf(model)
    spec_path = LAB / "bundle.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tag), sort_keys=False))
    bundle.build(spec_path, BUNDLE, log=log)
    return BUNDLE
