"""
The GPUs of each GPU service, seen from inside its container after a run that changed its host.

A running container can lose its GPUs without a sign: with Docker's systemd cgroup driver and no
/dev/char links, a ``systemctl daemon-reload`` (which gpufleet runs whenever it writes a unit)
rewrites the container's device rules without the NVIDIA devices (NVIDIA/nvidia-container-toolkit#48);
a driver, toolkit or engine change can do the same. After any change on the host, each GPU service's
container is asked to list its GPUs (``nvidia-smi -L``, which the toolkit mounts into it); one that
cannot is restarted (its new container gets its devices again) and named. A run that changed nothing
asks nothing.
"""

from pyinfra import host
from pyinfra.api import operation

from operations.core.host_memo import changes_so_far
from operations.services.names import managed_name


def gpu_services(services):
    """The names of the services that use GPUs (``gpus`` other than "none") (pure)."""
    return [service["name"] for service in services if service.get("gpus", "all") != "none"]


def check_command(name):
    """The check of service ``name``'s container, restarting its unit when the GPUs are gone (pure)."""
    container = managed_name(name)
    return (
        f"docker exec {container} nvidia-smi -L >/dev/null 2>&1 || {{ "
        f"echo 'gpufleet: {container} lost its GPUs (nvidia-smi -L fails inside it): restarting it' >&2; "
        f"systemctl restart {container}.service; }}"
    )


def host_changed():
    """The condition pyinfra asks when the check's turn comes: did any operation on this host change
    something (or fail) in this run."""
    current = host._get_module()
    return lambda: changes_so_far(current.state, current) > 0


@operation(is_idempotent=False)
def gpus_seen_inside(services: list[str]):
    """
    Ask each of ``services``' containers for its GPUs; restart and name one that lost them.

    + services: the GPU services of the host (``gpu_services``)
    """
    for name in services:
        yield check_command(name)
