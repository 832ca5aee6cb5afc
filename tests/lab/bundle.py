"""The lab's offline bundle: Debian's Docker and NVIDIA driver packages with their dependencies,
the toolkit test doubles, the llama.cpp server image and a tiny GGUF, the vLLM CPU image and a tiny
Hugging Face-format Llama (tests/e2e/test_inference_vllm.py serves them), built with
``python -m operations.offline.bundle``'s builder into .lab/bundle (reused when intact). It also carries a
weight volume and an image that no lab service uses: a host gets only what its services use."""

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from operations.core import settings
from operations.driver import install as nvidia_driver
from operations.driver import plan as driver_plan
from operations.offline.bundle import builder
from operations.toolkit import install as nvidia_toolkit

from . import image, llamacpp, models, rag, vllm

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


def spec(image_tag, driver_version=DRIVER_VERSION, vllm_image=None, rag_images=()):
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
        "images": [image_tag, UNUSED_IMAGE, *([vllm_image] if vllm_image else []), *rag_images],
        "weights": {
            "tiny": {"from": "models/tiny"},
            "unused": {"from": "models/unused"},
            **({"tiny-hf": {"from": "models/tiny-hf"}} if vllm_image else {}),
            **({"gemma": {"from": "models/gemma"}} if rag_images else {}),
        },
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


def _link_archive(tag, archive, out):
    """Hand the builder the image's cached ``docker save`` archive (a hard link, with the image ID it
    stamps its own with), so it does not save 3 GB again; it saves as usual where no link can be made."""
    image_id = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True, check=True
    ).stdout.strip()
    target = out / "images" / builder.archive_name(tag)
    stamp = target.with_suffix(".id")
    if stamp.exists() and stamp.read_text() == image_id:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(archive, target)
    except OSError:
        return
    stamp.write_text(image_id)


def _vllm_image(log):
    """The vLLM image and the tiny Hugging Face-format Llama it writes."""
    tag = vllm.ensure_image(log=log)[0]
    if not (LAB / "models" / "tiny-hf").exists():
        models.write_tiny_hf(LAB / "models" / "tiny-hf", tag)
    return tag


def _rag_images(log):
    """The RAG stack's images and the Gemma model its lab services serve."""
    tags = [rag.ensure_image(name, log=log)[0] for name in rag.IMAGES]
    if not (LAB / "models" / "gemma").exists():
        models.write_gemma(LAB / "models" / "gemma")
    return tags


def images(log=print, with_vllm=True):
    """The images the bundle carries, built or found cached, and the models written with them:
    (llama.cpp's tag, vLLM's tag or None, the RAG stack's tags). Cold, llama.cpp's compile runs here
    while the vLLM image and the RAG stack's install beside it (they wait on downloads and disk more
    than on CPU)."""
    image.ensure_image(log=log)  # the base of the images below, built once before they start
    with ThreadPoolExecutor(max_workers=2) as beside:
        vllm_built = beside.submit(_vllm_image, log) if with_vllm else None
        rag_built = beside.submit(_rag_images, log) if with_vllm else None
        tag, _ = llamacpp.ensure_image(log=log)
        model = LAB / "models" / "tiny" / "tiny.gguf"
        if not model.exists():
            models.write_tiny_gguf(model)
        return tag, vllm_built.result() if vllm_built else None, rag_built.result() if rag_built else []


def build(log=print, driver_version=DRIVER_VERSION, out=BUNDLE, with_vllm=True):
    """Build or refresh the lab's bundle (.lab/bundle; another driver version: give another ``out``,
    and ``with_vllm=False`` to leave out the vLLM image's 3 GB and the RAG stack's images and model);
    returns its path."""
    tag, vllm_tag, rag_images = images(log=log, with_vllm=with_vllm)
    _unused()
    _link_archive(tag, llamacpp.archive_path(), out)
    if with_vllm:
        _link_archive(vllm_tag, vllm.archive_path(), out)
        for name, rag_tag in zip(rag.IMAGES, rag_images, strict=True):
            _link_archive(rag_tag, rag.archive_path(name), out)
    spec_path = LAB / f"{out.name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec(tag, driver_version, vllm_tag, rag_images), sort_keys=False))
    builder.build(spec_path, out, log=log)
    return out
