"""
The roles a host of the inventory plays, each a ``@deploy`` composed of the concern deploys:

- ``every_host``: settings checked, gpufleet's directories, relays served, the bundle's packages
- ``proxmox_host`` (group proxmox_hosts): driver with its kernel module, device nodes, guests' config
- ``gpu_host`` (group gpu_hosts): driver, container engine, toolkit, images, inference services
- ``lxc_guest`` (groups gpu_hosts and lxc_guests): the same, with its Proxmox host's driver version
- ``gateway_host`` (group gateway_hosts): the site's gateway, one TLS endpoint for every host's services
- ``gpu_host`` also runs the RAG stack on a host of rag_hosts (operations/rag): Open WebUI, a vector database
- ``monitoring``: the node exporter when the inventory has monitoring hosts; Prometheus on those (monitoring_hosts)
- ``finish``: what the roles returned, written to host.json for the checks; guests restarted last

Each role returns the part of the host's summary (host.json) it is responsible for. pyinfra
prefixes an operation's name with its role's: "GPU host | Install NVIDIA driver | ...".
"""

from contextlib import contextmanager

from pyinfra import host, logger
from pyinfra.api import deploy

from operations import rollout
from operations.container import containerd, docker, podman
from operations.core import base, checks, liveness, remote
from operations.core.site_hosts import site_hosts
from operations.driver import devices
from operations.driver import install as nvidia_driver
from operations.gateway import drain as gateway_drain
from operations.gateway import install as gateway
from operations.gateway import pools as gateway_pools
from operations.monitoring import exporters, prometheus
from operations.monitoring import gpus as gpu_metrics
from operations.monitoring import inventory as monitoring_inventory
from operations.offline import from_bundle as offline
from operations.offline import staging
from operations.proxmox import passthrough as proxmox
from operations.rag import parts as rag_parts
from operations.rag import stack as rag_stack
from operations.services import inference
from operations.toolkit import install as nvidia_toolkit
from operations.toolkit import service_gpus

# The container runtime a GPU host runs (nvidia_toolkit_engine) -> (its install deploy, returning its
# configuration operation or None; the deploy that restarts it after any of the given operations changed)
CONTAINER_RUNTIMES = {
    "docker": (docker.install_docker, docker.restart_on_change),
    "containerd": (containerd.install_containerd, containerd.restart_on_change),
    "podman": (podman.install_podman, podman.restart_on_change),
}
# What a host without a GPU skips, said plainly at the end of its run.
GPU_ONLY_STEPS = [
    "driver module checks",
    "persistence daemon",
    "reboot",
    "/dev/char links",
    "GPU container run",
    "GPU-only inference services",
    "GPU metrics (dcgm-exporter)",
    "each GPU service's GPUs checked from inside its container",
]


@contextmanager
def planned_unless_failed():
    """This host's plan, unless the host fails while it is planned (a frozen host whose facts cannot be
    read: pyinfra fails it and hands back empty facts): then its plan stops there, said so, and the
    other hosts' plans go on. Any other error stops the run, as before."""
    try:
        yield
    except Exception:
        if host in host.state.active_hosts or not host.state.active_hosts:  # not this host's failure, or none left
            raise
        logger.error(f"[{host.name}] failed while its steps were planned: the rest of its plan is left out")


def check_settings():
    """Refuse bad data and a login that cannot become root, before any host changes; warn of unknown groups."""
    liveness.watch_every_host(host.state)  # a host that freezes from here on is failed in bounded time
    checks.validate(checks.host_settings(host), host.name)
    if "rag_hosts" in host.groups:
        site = site_hosts()
        gateways = [name for name, _, groups in site if "gateway_hosts" in groups]
        rag_parts.check_stack(checks.host_settings(host), host.name, host.groups, gateways)
        gateway_pools.rag_stack(site, None)  # one stack per site's gateway
    monitoring_inventory.watchers()  # the monitoring hosts' addresses, which the exporters' firewall admits
    for group in checks.unknown_groups(host.groups):
        logger.warning(
            f"[{host.name}] group {group!r}: gpufleet does not know it and no group_data/{group}.py "
            "names it, so it changes nothing for this host (a misspelt group?)"
        )
    remote.require_root(host)


@deploy("Every host")
def every_host():
    """gpufleet's directories, the relay sender on a seed, the bundle's packages on a bundle host."""
    base.prepare()
    staging.serve_relays()
    if host.data.get("gpufleet_bundle"):
        offline.stage_packages()
    return {"groups": sorted(host.groups), "gpus": len(devices.gpus()), "docker": False, "services": []}


@deploy("Proxmox host")
def proxmox_host():
    """
    The driver with its kernel module, the device nodes at boot, and every guest naming this host
    configured. Returns the summary part and the guests whose configuration changes (for ``finish``).
    """
    nvidia_driver.install_driver()
    proxmox.prepare_host()
    guest_changes = proxmox.configure_guests()
    return (
        {
            "nvidia_driver_version": host.data.nvidia_driver_version,
            "lxc_guests": sorted(int(guest.data.proxmox_vmid) for guest, _ in guest_changes),
        },
        guest_changes,
    )


@deploy("GPU host")
def gpu_host(driver_version: str | None = None):
    """The pinned driver with its kernel module, then the serving stack.

    + driver_version: the exact version a rollout moves a branch pin to (``upgrade.py``); otherwise
      ``nvidia_driver_version``, whose branch keeps the point release the host has
    """
    driver = nvidia_driver.install_driver(version=driver_version)
    return {"nvidia_driver_version": host.data.nvidia_driver_version, **_serving_stack(driver)}


@deploy("Rolling upgrade")
def rolled_gpu_host():
    """``upgrade.py``, in this host's batch: drain its services, run the GPU host role (the pinned
    driver and toolkit, services started again), then verify it serves before the next batch."""
    services = host.data.inference_services
    pooled = [service["name"] for service in services if service.get("proxy_port")]
    for name in pooled:
        gateway_drain.drained(
            name=f"Take the host out of the gateways' pool {name} and let its requests there finish",
            service=name,
            timeout=host.data.gpufleet_upgrade_drain_timeout,
        )
    rollout.drained(
        name="Drain the inference services: open requests finish, then they stop",
        ports=inference.guarded_ports(services),
        timeout=host.data.gpufleet_upgrade_drain_timeout,
    )
    moving = nvidia_driver.upgrade_from()  # read before anything changes: (installed, the version to roll to)
    summary = gpu_host(driver_version=moving[1] if moving else None)
    rollout.verified(
        name="Verify the host serves again (loaded module on a GPU host, every service's endpoint)",
        services=services,
        gpus=len(devices.gpus()),
    )
    for name in pooled:
        gateway_drain.readmitted(
            name=f"Put the host back into the gateways' pool {name} once their checks see it up",
            service=name,
        )
    return summary


@deploy("LXC guest")
def lxc_guest(driver_version: str):
    """
    The driver's user-space libraries at ``driver_version`` (its Proxmox host's loaded module, from
    ``proxmox.guest_driver_version``), then the serving stack, device cgroups left to the host when
    the guest is unprivileged and /dev/char links to the host.
    """
    driver = nvidia_driver.install_driver(version=driver_version, kernel_module=False)
    unprivileged = proxmox.guest_is_unprivileged()
    lxc = {"proxmox_host": host.data.proxmox_host, "vmid": int(host.data.proxmox_vmid), "unprivileged": unprivileged}
    return {
        "nvidia_driver_version": driver_version,
        "lxc": lxc,
        **_serving_stack(driver, no_cgroups=unprivileged, dev_char_symlinks=False),
    }


@deploy("Gateway")
def gateway_host():
    """HAProxy in front of every host's TLS fronts: one pool per service, keys checked, health-checked.
    A host that left gateway_hosts has the gateway removed."""
    if "gateway_hosts" not in host.groups:
        gateway.remove_if_left()
        return {}
    return gateway.install()


@deploy("Monitoring")
def monitoring():
    """The node exporter, for the inventory's monitoring hosts (stopped when it has none); on a host of
    monitoring_hosts, the site's Prometheus (removed from a host that left the group)."""
    summary = exporters.install().get("monitoring", {})
    if "monitoring_hosts" in host.groups:
        summary = {**summary, **prometheus.install()["monitoring"]}
    else:
        prometheus.remove_if_left()
    return {"monitoring": summary} if summary else {}


def _serving_stack(driver, no_cgroups=False, dev_char_symlinks=None):
    """
    Container runtime, NVIDIA Container Toolkit, the GPU container check, images and inference services.

    + driver: the driver's package operation (the toolkit and the GPU check react to its change)
    + no_cgroups: leave device cgroups to the host (an unprivileged LXC guest)
    + dev_char_symlinks: keep /dev/char links (None: ``nvidia_toolkit_dev_char_symlinks``)
    """
    gpus = len(devices.gpus())
    runtime_name = host.data.nvidia_toolkit_engine
    on_docker = runtime_name == "docker"
    runtime_applied, toolkit = _runtime_with_toolkit(runtime_name, driver, gpus, no_cgroups, dev_char_symlinks)
    image_ops = _images(gpus) if on_docker else {}
    if gpus:
        nvidia_toolkit.check_gpu_container(
            after=[op for op in (driver, toolkit, *runtime_applied) if op], engine=runtime_name
        )
    services = _services(gpus, image_ops) if on_docker else []
    rag = {}
    if on_docker:  # the RAG stack after the services it uses; removed from a host that left rag_hosts
        rag = rag_stack.install(image_ops) if "rag_hosts" in host.groups else rag_stack.remove_if_left()
        gpu_metrics.install(gpus, image_op=image_ops.get(host.data.monitoring_dcgm_exporter_image))
    guarded = on_docker and host.data.inference_firewall and bool(services)
    return {
        "engine": runtime_name,
        "docker": on_docker,
        "services": services,
        "firewall": guarded,
        "allowed_sources": list(host.data.inference_allowed_sources) if guarded else [],
        "nvidia_toolkit_version": host.data.nvidia_toolkit_version,
        "nvidia_toolkit_check_image": host.data.nvidia_toolkit_check_image,
        **rag,
    }


def _runtime_with_toolkit(runtime_name, driver, gpus, no_cgroups, dev_char_symlinks):
    """The container runtime and the toolkit wired into it; the runtime reloaded or restarted when either
    changed its configuration. Returns ``([the operations that apply it], the toolkit's package operation)``."""
    install_runtime, restart_runtime = CONTAINER_RUNTIMES[runtime_name]
    runtime_config = install_runtime()
    toolkit_runtime, toolkit = nvidia_toolkit.install_toolkit(
        no_cgroups=no_cgroups, dev_char_symlinks=dev_char_symlinks, gpus=gpus, driver=driver
    )
    return restart_runtime([op for op in (runtime_config, toolkit_runtime) if op]), toolkit


def _images(gpus):
    """Registry access, then every image the host runs (the GPU check's too, where the bundle carries it)."""
    docker.registry_access()
    check_image = host.data.nvidia_toolkit_check_image
    images = [service["image"] for service in host.data.inference_services]
    if gpus and offline.carries(host.data.get("gpufleet_bundle"), check_image):
        images.append(check_image)  # otherwise the check's `docker run --pull missing` fetches it
    if gpu_metrics.wanted(gpus):
        images.append(host.data.monitoring_dcgm_exporter_image)
    if "rag_hosts" in host.groups:
        images += [host.data.rag_vector_db_image, host.data.rag_webui_image]
    return inference.install_images(images)


def _services(gpus, image_ops):
    """The inference services, said one line each; returns what host.json records of them."""
    results = inference.install_services(gpus=gpus, image_ops=image_ops)
    inference.summary(results)
    return [inference.intent(service, ready is not None, where) for service, ready, where in results]


def finish(summary, guest_changes=()):
    """
    Say plainly what a host without GPUs skipped, write ``summary`` to host.json, then restart the
    Proxmox guests whose configuration changed (last: the guests' own steps have run).
    """
    if not summary["gpus"]:
        skipped = GPU_ONLY_STEPS + (["device node service start"] if "lxc_guests" in summary else [])
        base.say_no_gpu(skipped)
    elif summary.get("docker") and service_gpus.gpu_services(host.data.inference_services):
        service_gpus.gpus_seen_inside(
            name="Check each GPU service still sees its GPUs from inside its container (after this run's changes)",
            services=service_gpus.gpu_services(host.data.inference_services),
            _if=service_gpus.host_changed(),
        )
    base.record(summary)
    if guest_changes:
        proxmox.restart_guests(guest_changes)
