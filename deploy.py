"""
gpufleet: turn the inventory's hosts into GPU inference hosts.

    pyinfra inventories/prod.py deploy.py [--dry] [--diff] [--limit HOST]

Which deploys apply is decided here from the host's groups and data; what each does is in
operations/. Settings (and the offline bundle, when one is named) are checked first: a bad value
stops the run before any host changes. A Proxmox VE host (proxmox_hosts) passes its GPUs to the
LXC guests (lxc_guests) that name it; a guest's libraries follow its host's driver version.
"""

from pyinfra import host

from operations import (base, config, containerd_engine, docker_engine, inference, nvidia_driver, nvidia_toolkit,
                        offline, podman_engine, proxmox, remote, staging)

config.validate(config.host_settings(host), host.name)
remote.require_root(host)  # a login that cannot become root is refused before any host changes
lxc_guest = "lxc_guests" in host.groups
guest_driver = proxmox.guest_driver_version() if lxc_guest else None  # refuses a mismatch up front

intent = {"groups": sorted(host.groups), "gpus": len(base.gpus()), "docker": False, "services": []}
skipped = ["driver module checks", "persistence daemon", "reboot", "/dev/char links", "GPU container run",
           "GPU-only inference services"]
base.prepare()
staging.serve_relays()
if host.data.get("gpufleet_bundle"):
    offline.stage_packages()

guest_changes = []
if "proxmox_hosts" in host.groups:
    nvidia_driver.install_driver()
    intent["nvidia_driver_version"] = host.data.nvidia_driver_version
    proxmox.prepare_host()
    guest_changes = proxmox.configure_guests()
    intent["lxc_guests"] = sorted(int(guest.data.proxmox_vmid) for guest, _ in guest_changes)
    skipped.append("device node service start")

image_ops = {}
if "gpu_hosts" in host.groups:
    if lxc_guest:
        driver = nvidia_driver.install_driver(version=guest_driver, kernel_module=False)
        unprivileged = proxmox.guest_is_unprivileged()
        intent["lxc"] = {"proxmox_host": host.data.proxmox_host, "vmid": int(host.data.proxmox_vmid),
                         "unprivileged": unprivileged}
    else:
        driver = nvidia_driver.install_driver()
        unprivileged = False
    intent["nvidia_driver_version"] = guest_driver or host.data.nvidia_driver_version
    engine = intent["engine"] = host.data.nvidia_toolkit_engine
    if engine == "docker":
        daemon_json = docker_engine.install_docker()
    elif engine == "containerd":
        containerd_engine.install_containerd()
    else:
        podman_engine.install_podman()
    runtime, toolkit = nvidia_toolkit.install_toolkit(
        no_cgroups=unprivileged, dev_char_symlinks=False if lxc_guest else None, gpus=intent["gpus"],
        driver_changed=driver.will_change)
    if engine == "docker":
        engine_ready = docker_engine.restart_on_change([daemon_json, runtime])
        docker_engine.registry_access()
    elif engine == "containerd":
        engine_ready = containerd_engine.restart_on_change([runtime])
    else:
        engine_ready = runtime  # Podman has no daemon: the CDI spec (None without GPUs) is all
    intent["nvidia_toolkit_version"] = host.data.nvidia_toolkit_version
    intent["nvidia_toolkit_check_image"] = host.data.nvidia_toolkit_check_image
    intent["docker"] = engine == "docker"
    if intent["docker"]:
        check_image = host.data.nvidia_toolkit_check_image
        images = [service["image"] for service in host.data.inference_services]
        if intent["gpus"] and offline.carries(host.data.get("gpufleet_bundle"), check_image):
            images.append(check_image)  # otherwise the check's `docker run --pull missing` fetches it
        image_ops = inference.install_images(images)
    if intent["gpus"]:
        nvidia_toolkit.check_gpu_container(after=[op for op in (driver, toolkit, engine_ready) if op], engine=engine)
    if intent["docker"]:
        results = inference.install_services(gpus=intent["gpus"], image_ops=image_ops)
        inference.summary(results)
        intent["services"] = [inference.intent(service, ready is not None) for service, ready in results]

if not intent["gpus"]:
    base.say_no_gpu(skipped)

base.record(intent)
if guest_changes:
    proxmox.restart_guests(guest_changes)  # last: the guests' own steps have run
