"""Container images loaded from ``docker save`` archives on the host, only when absent."""

import re
import shlex

from pyinfra import host
from pyinfra.api import FactBase, operation

PINNED = re.compile(r"^[\w.\-/:]+(:[\w.\-]+|@sha256:[0-9a-f]{64})$")


def pinned(image):
    """True for an image named by a tag other than ``latest``, or by digest."""
    return bool(PINNED.match(image)) and not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1]


class DockerImageIds(FactBase):
    """
    Returns the image IDs Docker holds, each with its tags.

    .. code:: python

        {"sha256:4f3c...": ["gpufleet-lab/llama-server:0.3.36-1a2b3c4d5e6f"]}
    """

    requires_command = "docker"

    def command(self):
        return "docker image ls --no-trunc --format '{{.ID}} {{.Repository}}:{{.Tag}}'"

    def process(self, output):
        images = {}
        for line in output:
            image_id, _, name = line.partition(" ")
            images.setdefault(image_id, []).append(name)
        return images


@operation()
def loaded(image, image_id, archive):
    """
    Load ``image`` from ``archive`` on the host unless Docker already holds ``image_id`` under that name.

    + image: the pinned name, e.g. ``vllm/vllm-openai:v0.6.3``
    + image_id: its ``sha256:`` ID (from the bundle's manifest)
    + archive: path on the host of the ``docker save`` archive
    """
    images = host.get_fact(DockerImageIds) or {}
    if image in images.get(image_id, []):
        host.noop(f"{image} already loaded ({image_id[:19]})")
        return
    yield f"docker load -q -i {shlex.quote(archive)}"
