"""Podman as the GPU hosts' engine: the distro package; GPUs reach its containers through the CDI
specification the toolkit generates (``podman run --device nvidia.com/gpu=all``)."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt


@deploy("Install Podman")
def install_podman():
    """Install Podman from the distro (daemonless: nothing to restart when the CDI spec changes)."""
    apt.packages(name="Install Podman", packages=["podman"], no_recommends=True,
                 update=not host.data.get("gpufleet_offline"), cache_time=3600)
