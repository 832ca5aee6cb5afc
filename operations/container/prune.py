"""
``gpufleet_prune = True``: container images and weight volumes that no service of the host uses
are removed once the services are in place (off by default: a removed image or volume must be
sent again to come back).
"""

import posixpath
import shlex

from pyinfra import host
from pyinfra.api import FactBase, operation


class DockerImages(FactBase):
    """
    Returns the engine's images (``repository:tag``, or the ID of an untagged one) and the images its
    containers, running or not, were made from, by ID:

    .. code:: python

        {"images": {"gpufleet-lab/llama-server:0.3.36-a9a207e305c9": "sha256:3f..."},
         "in_use": ["sha256:3f..."]}
    """

    @staticmethod
    def default():
        return {"images": {}, "in_use": []}

    def command(self):
        return (
            "command -v docker >/dev/null || exit 0; "
            "docker image ls --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}'; echo --; "
            "docker ps -a -q --no-trunc | xargs -r docker inspect -f '{{.Image}}'"
        )

    def process(self, output):
        found, in_use, part = {}, [], "images"
        for line in output:
            if line == "--":
                part = "in_use"
            elif part == "images" and " " in line:
                name, image_id = line.rsplit(" ", 1)
                found[image_id if name == "<none>:<none>" else name] = image_id
            elif part == "in_use" and line.strip():
                in_use.append(line.strip())
        return {"images": found, "in_use": sorted(set(in_use))}


class WeightVolumes(FactBase):
    """Returns the names of the directories under ``root`` (weight volumes), sorted."""

    @staticmethod
    def default():
        return []

    def command(self, root):
        return f"if [ -d {shlex.quote(root)} ]; then find {shlex.quote(root)} -mindepth 1 -maxdepth 1 -type d -printf '%f\\n'; fi"

    def process(self, output):
        return sorted(line for line in output if line)


def unused_images(found, keep):
    """The images (by name, or ID when untagged) that no container was made from and ``keep`` does
    not name (pure)."""
    return sorted(
        name for name, image_id in found["images"].items() if name not in keep and image_id not in found["in_use"]
    )


@operation()
def pruned(keep_images: list[str], keep_volumes: list[str], weights_root: str):
    """
    Remove the images no container uses and ``keep_images`` does not name, and the weight volumes
    under ``weights_root`` that ``keep_volumes`` does not name (hidden directories are left alone).
    """
    images = unused_images(host.get_fact(DockerImages), set(keep_images))
    volumes = [
        name
        for name in host.get_fact(WeightVolumes, root=weights_root)
        if name not in set(keep_volumes) and not name.startswith(".")
    ]
    if images:
        yield f"docker image rm {' '.join(shlex.quote(image) for image in images)}"
    for name in volumes:
        yield f"rm -rf {shlex.quote(posixpath.join(weights_root, name))}"
    if not images and not volumes:
        host.noop(f"every image and weight volume here is in use ({len(keep_volumes)} volume(s))")
