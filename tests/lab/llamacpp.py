"""
The lab's llama.cpp server image, built here with no registry: llama.cpp's own ``llama-server``
compiled from the source that PyPI's llama-cpp-python sdist carries (portable: GGML_NATIVE off,
CPU only), put in a minimal root file system with the libraries it links, ``docker import``-ed
and saved as an archive. Binary, image archive and tag are all cached by the recipe's hash.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .image import CACHE_DIR, ensure_archived, recipe_key

SDIST = "llama-cpp-python==0.3.36"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
]
# What the image declares, as the upstream server image does (ghcr.io/ggml-org/llama.cpp:server).
IMAGE_CHANGES = [
    'ENTRYPOINT ["/app/llama-server"]',
    "ENV LLAMA_ARG_HOST=0.0.0.0",
    "ENV LLAMA_ARG_PORT=8080",
    "EXPOSE 8080",
    "USER 65534:65534",
    "WORKDIR /tmp",
]
PASSWD = "root:x:0:0:root:/root:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def recipe():
    return {"sdist": SDIST, "cmake": CMAKE_FLAGS, "changes": IMAGE_CHANGES, "format": 1}


def key():
    return recipe_key(recipe(), length=12)


def image_tag():
    """Pinned by the llama-cpp-python release and the recipe hash; never ``latest``."""
    return f"gpufleet-lab/llama-server:{SDIST.split('==')[1]}-{key()}"


def archive_path():
    return CACHE_DIR / "images" / f"llama-server-{key()}.tar"


def _binary(log):
    binary = CACHE_DIR / "llamacpp" / key() / "llama-server"
    if binary.exists():
        return binary
    work = Path(tempfile.mkdtemp(prefix="gpufleet-llamacpp-"))
    try:
        sdists = CACHE_DIR / "llamacpp" / "sdist"
        if not list(sdists.glob("*.tar.gz")):
            log(f"downloading the {SDIST} sdist (source of llama.cpp)")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    SDIST,
                    "-d",
                    str(sdists),
                ],
                check=True,
            )
        with tarfile.open(next(sdists.glob("*.tar.gz"))) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("*/vendor/llama.cpp"))
        log(f"compiling llama-server from {source.relative_to(work)} (several minutes on 2 cores)")
        build = work / "build"
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL
        )
        subprocess.run(
            ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary.with_suffix(".partial"))
        binary.with_suffix(".partial").rename(binary)
        return binary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _shared_libraries(binary):
    """The libraries ``binary`` loads, as ldd resolves them on this machine (Debian 12, as the hosts)."""
    libraries = []
    for line in subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libraries.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libraries.append(parts[0])
    return libraries


def _build_archive(archive, tag, log):
    binary = _binary(log)
    root = Path(tempfile.mkdtemp(prefix="gpufleet-llamacpp-root-"))
    try:
        (root / "app").mkdir()
        shutil.copy2(binary, root / "app" / "llama-server")
        for library in _shared_libraries(binary):
            target = root / library.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(library), target)
        (root / "etc").mkdir()
        (root / "etc" / "passwd").write_text(PASSWD)
        (root / "etc" / "group").write_text(GROUP)
        for directory, mode in (("tmp", 0o1777), ("models", 0o755)):
            (root / directory).mkdir()
            os.chmod(root / directory, mode)
        changes = [arg for change in IMAGE_CHANGES for arg in ("--change", change)]
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "--owner=0", "--group=0", "-c", "."], stdout=subprocess.PIPE
        )
        subprocess.run(
            ["docker", "import", *changes, "-", tag], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL
        )
        if tar.wait() != 0:
            raise RuntimeError("tar of the llama-server root file system failed")
        archive.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["docker", "save", "-o", str(archive.with_suffix(".partial")), tag], check=True)
        archive.with_suffix(".partial").rename(archive)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ensure_image(log=print):
    """Return (tag, archive): the image in this machine's Docker and as a ``docker save`` archive."""
    return ensure_archived(image_tag(), archive_path(), _build_archive, log=log)
