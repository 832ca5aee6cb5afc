"""
Hosts fed from an offline bundle (operations/offline/bundle/): its apt repository staged and used as a
source, the images the host runs loaded into Docker. Air-gapped hosts need nothing else.
"""

import posixpath
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, server

from operations.container import images as docker_images
from operations.core import settings
from operations.core.errors import ConfigError
from operations.offline import bundle, staging

SOURCE_LIST = "/etc/apt/sources.list.d/gpufleet-bundle.list"
# Update only the bundle's source, and keep the lists of the others (unreachable, not wrong).
OFFLINE_UPDATE = (
    f"apt-get update -o Dir::Etc::SourceList={SOURCE_LIST} -o Dir::Etc::SourceParts=- -o APT::Get::List-Cleanup=0"
)


def check_bundle(data, host_name):
    if data.get("gpufleet_bundle") and data.get("gpufleet_bundle_signers"):
        bundle.check_signature(data["gpufleet_bundle"], data["gpufleet_bundle_signers"])
    if not data.get("gpufleet_offline"):
        return
    if not data.get("gpufleet_bundle"):
        raise ConfigError(
            "gpufleet_bundle",
            "an offline host needs a bundle to install from (python -m operations.offline.bundle build ...)",
            host=host_name,
        )
    for field in ("nvidia_driver_source", "nvidia_toolkit_source"):
        if data.get(field) not in (None, "bundle"):
            raise ConfigError(field, f"must be 'bundle' on an offline host, got {data[field]!r}", host=host_name)


@deploy("Stage the bundle's packages", data_defaults=settings.DEFAULTS)
def stage_packages(bundle_path: str | None = None, bundle_dir: str | None = None, offline: bool | None = None):
    """
    Stage the bundle's apt repository on the host and make it an apt source.

    + bundle_path: the bundle on the control node (``gpufleet_bundle``)
    + bundle_dir: where bundles are staged on the host (``gpufleet_bundle_dir``)
    + offline: the host reaches nothing: apt updates only the bundle's source (``gpufleet_offline``)
    """
    bundle_path = bundle_path or host.data.gpufleet_bundle
    bundle_dir = bundle_dir or host.data.gpufleet_bundle_dir
    offline = host.data.gpufleet_offline if offline is None else offline
    contents = bundle.load(bundle_path)
    packages = bundle.part(contents, "apt")
    if not packages:
        return
    repo = posixpath.join(bundle_dir, "apt")
    staged = staging.stage(
        name="Stage the bundle's apt repository", src=f"{bundle_path}/apt", dest=repo, files=packages
    )
    source = files.put(
        name="Add the bundle's apt repository",
        src=StringIO(f"deb [trusted=yes] file:{repo} ./\n"),
        dest=SOURCE_LIST,
        mode="644",
        user="root",
        group="root",
        create_remote_dir=False,
    )
    changed = lambda: staged.did_change() or source.did_change()  # noqa: E731
    if offline:
        server.shell(name="Update apt lists from the bundle only", commands=[OFFLINE_UPDATE], _if=changed)
    else:
        apt.update(name="Update apt lists after the bundle changed", _if=changed)


@deploy("Load the bundle's container images", data_defaults=settings.DEFAULTS)
def load_images(images: list[str], bundle_path: str | None = None, bundle_dir: str | None = None):
    """
    Stage the archives of ``images`` from the bundle and ``docker load`` each one Docker does not hold yet.

    + images: names of images the bundle carries (only these archives are sent)
    + bundle_path: the bundle on the control node (``gpufleet_bundle``)
    + bundle_dir: where bundles are staged on the host (``gpufleet_bundle_dir``)

    Returns the load operation of each image, by name.
    """
    bundle_path = bundle_path or host.data.gpufleet_bundle
    bundle_dir = bundle_dir or host.data.gpufleet_bundle_dir
    carried = {image["name"]: image for image in bundle.load(bundle_path).get("images", [])}
    chosen = [carried[name] for name in sorted(set(images))]
    if not chosen:
        return {}
    archives = bundle.part(bundle.load(bundle_path), "images")
    staging.stage(
        name="Stage the bundle's image archives",
        src=f"{bundle_path}/images",
        dest=posixpath.join(bundle_dir, "images"),
        files={
            path: entry for path, entry in archives.items() if f"images/{path}" in {image["file"] for image in chosen}
        },
    )
    return {
        image["name"]: docker_images.loaded(
            name=f"Load image {image['name']}",
            image=image["name"],
            image_id=image["id"],
            archive=posixpath.join(bundle_dir, image["file"]),
        )
        for image in chosen
    }


def carries(bundle_path, image):
    """True when the bundle at ``bundle_path`` (None: no bundle) holds ``image``."""
    return bool(bundle_path) and image in {entry["name"] for entry in bundle.load(bundle_path).get("images", [])}


def offers(bundle_path, package, version):
    """True when the bundle at ``bundle_path`` carries ``package`` at upstream ``version`` (or, for a
    branch such as ``535``, a version of it) in its apt repository."""
    if not bundle_path:
        return False
    prefix = f"apt/{package}_" + (f"{version}-" if "." in version else f"{version}.")
    return any(path.startswith(prefix) for path in bundle.load(bundle_path).get("files", {}))
