"""
The lab's images of the RAG stack, built here with no registry, laid out as their upstream images are:

- Open WebUI: PyPI's ``open-webui`` 0.12.4 with the exact packages of ``open-webui.lock.txt`` (no
  torch: gpufleet's embeddings come from the fleet) installed with ``pip --target`` on the lab host's
  Debian 12 root file system (python3 3.11, as upstream's python:3.11 base), in ``/app/backend`` with
  its data in ``/app/backend/data`` and started by ``bash start.sh`` as ghcr.io/open-webui/open-webui
  is; ``start.sh`` does what upstream's does for gpufleet's settings: WEBUI_SECRET_KEY from
  ``./.webui_secret_key`` when the variable is empty, then uvicorn on HOST:PORT (upstream's
  Playwright, Ollama, CUDA and Hugging Face Space branches and its ``tee server.log`` left out).
- Chroma's server: PyPI's ``chromadb`` 1.5.9 (``chroma run``: its Rust frontend), the packages of
  ``chroma.lock.txt``, entrypoint ``chroma`` as the ``chroma`` console script runs it.

Wheels, archives and tags are cached by the recipe's hash.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from . import image
from .image import CACHE_DIR, ensure_archived, recipe_key

HERE = Path(__file__).resolve().parent
START_SH = """#!/usr/bin/env bash
# Open WebUI's backend/start.sh, for the lab image: the secret key from ./.webui_secret_key when
# WEBUI_SECRET_KEY is empty (upstream's image sets it to ""), then uvicorn on HOST:PORT.
SCRIPT_DIR=$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )
cd "$SCRIPT_DIR" || exit
KEY_FILE=.webui_secret_key
PORT="${PORT:-8080}"
HOST="${HOST:-0.0.0.0}"
if test "$WEBUI_SECRET_KEY $WEBUI_JWT_SECRET_KEY" = " "; then
  echo "Loading WEBUI_SECRET_KEY from file, not provided as an environment variable."
  if ! [ -e "$KEY_FILE" ]; then
    echo "Generating WEBUI_SECRET_KEY"
    echo $(head -c 12 /dev/random | base64) > "$KEY_FILE"
  fi
  echo "Loading WEBUI_SECRET_KEY from $KEY_FILE"
  WEBUI_SECRET_KEY=$(cat "$KEY_FILE")
fi
WEBUI_SECRET_KEY="$WEBUI_SECRET_KEY" exec python3 -m uvicorn open_webui.main:app --host "$HOST" --port "$PORT" \\
  --forwarded-allow-ips '*' --workers "${UVICORN_WORKERS:-1}"
"""
# The ``chroma`` console script, which pip --target writes with this machine's interpreter path.
CHROMA_SH = """#!/bin/sh
exec python3 -c 'import sys; from chromadb.cli.cli import app; sys.argv[0] = "chroma"; sys.exit(app())' "$@"
"""
IMAGES = {
    "open-webui": {
        "version": "0.12.4",
        "lock": HERE / "open-webui.lock.txt",
        "target": "/app/python",
        "files": {"/app/backend/start.sh": START_SH},
        "dirs": ["/app/backend/data"],
        # The web app where upstream's image has it (/app/build, Open WebUI's FRONTEND_BUILD_DIR default
        # for /app/backend's package); the wheel carries it in the package.
        "links": {"/app/build": "/app/python/open_webui/frontend"},
        # What upstream's Dockerfile declares (ENV, WORKDIR, EXPOSE, CMD), with the packages' path.
        "changes": [
            "ENV PYTHONPATH=/app/python",
            "ENV ENV=prod",
            "ENV PORT=8080",
            "ENV DATA_DIR=/app/backend/data",
            "ENV WEBUI_SECRET_KEY=",
            "ENV SCARF_NO_ANALYTICS=true",
            "ENV DO_NOT_TRACK=true",
            "ENV ANONYMIZED_TELEMETRY=false",
            "WORKDIR /app/backend",
            "EXPOSE 8080",
            'CMD ["bash", "start.sh"]',
        ],
    },
    "chroma": {
        "version": "1.5.9",
        "lock": HERE / "chroma.lock.txt",
        "target": "/app/python",
        "files": {"/usr/local/bin/chroma": CHROMA_SH},
        "dirs": ["/data"],
        "links": {},
        "changes": [
            "ENV PYTHONPATH=/app/python",
            "ENV ANONYMIZED_TELEMETRY=false",
            "WORKDIR /data",
            "EXPOSE 8000",
            'ENTRYPOINT ["chroma"]',
            'CMD ["run", "--path", "/data", "--host", "0.0.0.0", "--port", "8000"]',
        ],
    },
}


def requirements(name):
    lines = IMAGES[name]["lock"].read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def recipe(name):
    spec = IMAGES[name]
    return {
        "name": name,
        "packages": requirements(name),
        "files": spec["files"],
        "dirs": spec["dirs"],
        "links": spec["links"],
        "base": image.image_key(),
        "changes": spec["changes"],
        "format": 1,
    }


def key(name):
    return recipe_key(recipe(name), length=12)


def image_tag(name):
    """Pinned by the release and the recipe hash; never ``latest``."""
    return f"gpufleet-lab/{name}:{IMAGES[name]['version']}-{key(name)}"


def archive_path(name):
    return CACHE_DIR / "images" / f"{name}-{key(name)}.tar"


def _wheels(name, log):
    """The lock's wheels, from PyPI (this machine's index), into the shared wheel cache."""
    wheels = CACHE_DIR / "rag" / "wheels"
    done = wheels / f".{name}-{key(name)}"
    if not done.exists():
        log(f"downloading {name}'s {len(requirements(name))} wheels")
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:"]
        subprocess.run([*command, "-d", str(wheels), "-r", str(IMAGES[name]["lock"])], check=True)
        done.touch()
    return wheels


def _build_archive(name):
    def build(archive, tag, log):
        spec, wheels, base = IMAGES[name], _wheels(name, log), image.ensure_image(log=log)
        work = Path(tempfile.mkdtemp(prefix=f"gpufleet-{name}-"))
        packages = work / "files" / spec["target"].lstrip("/")
        container = f"gpufleet-{name}-build-{key(name)}"
        try:
            log(f"installing {name} {spec['version']} into its image (a minute or two)")
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", str(wheels)]
                + ["--target", str(packages), "-r", str(spec["lock"])],
                check=True,
            )
            subprocess.run(["rm", "-rf", str(packages / "bin")], check=True)  # scripts with this machine's paths
            for path, text in spec["files"].items():
                local = work / "files" / path.lstrip("/")
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(text)
                local.chmod(0o755)
            for directory in spec["dirs"]:
                (work / "files" / directory.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for link, target in spec["links"].items():
                (work / "files" / link.lstrip("/")).symlink_to(target)
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)
            subprocess.run(["docker", "create", "--name", container, base, "true"], check=True, capture_output=True)
            subprocess.run(["docker", "cp", f"{work / 'files'}/.", f"{container}:/"], check=True)
            image.commit_and_save(container, tag, spec["changes"], archive)
        finally:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)
            subprocess.run(["rm", "-rf", str(work)], check=False)

    return build


def ensure_image(name, log=print):
    """Return (tag, archive) of lab image ``name`` (open-webui or chroma): in this machine's Docker and
    as a ``docker save`` archive."""
    return ensure_archived(image_tag(name), archive_path(name), _build_archive(name), log=log)
