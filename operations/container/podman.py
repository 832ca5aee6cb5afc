"""Podman as the GPU hosts' engine: the distro package; GPUs reach its containers through the CDI
specification the toolkit generates (``podman run --device nvidia.com/gpu=all``)."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt


@deploy("Install Podman")
def install_podman():
    """Install Podman from the distro (daemonless: nothing to restart when the CDI spec changes)."""
    apt.packages(
        name="Install Podman",
        packages=["podman"],
        no_recommends=True,
        update=not host.data.get("gpufleet_offline"),
        cache_time=3600,
    )


def restart_on_change(config_ops):
    """
    Podman has no daemon: nothing restarts. Its containers read the CDI spec as it is, so the
    operation that writes it (the last of ``config_ops``; none on a host without GPUs) is the one
    after which they see GPUs. Returns ``[that operation]`` or ``[]``.
    """
    return config_ops[-1:]
