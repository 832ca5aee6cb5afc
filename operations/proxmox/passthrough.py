"""Proxmox VE LXC GPU passthrough: the host keeps the kernel module and device nodes and passes
them to its guests; a guest takes user-space libraries of exactly its host's driver version.

A guest names its host and VMID (``proxmox_host``, ``proxmox_vmid``); one deploy converges both.
"""

import re
import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host, inventory, logger
from pyinfra.api import deploy, operation
from pyinfra.facts.files import FileContents
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from operations import TEMPLATES, TOOLS_DIR
from operations.core import other_hosts, settings
from operations.core.errors import ConfigError, HostStateError
from operations.driver import devices
from operations.driver.devices import NvidiaDeviceNodes, NvidiaKernelModule
from operations.proxmox.facts import (
    GPU_DEVICE_NAMES,
    PctConfig,
    PctStatus,
    ProcDevices,
    PveVersion,
    parse_property_string,
)

SYNTAXES = ("auto", "dev", "lxc")
CONF_DIR = "/etc/pve/lxc"
MODULES_LOAD = "/etc/modules-load.d/gpufleet-nvidia.conf"
NODES_UNIT = "gpufleet-nvidia-device-nodes"
# The awk program that edits a guest's .conf (sent inline; its comments are awk's own).
CONF_EDIT = (TEMPLATES / "gpufleet-conf-edit.awk").read_text()
# Nodes a guest needs: the GPUs, the control device, unified memory, modeset and MIG capabilities.
GUEST_NODE = re.compile(
    r"^/dev/(nvidia\d+|nvidiactl|nvidia-uvm|nvidia-uvm-tools|nvidia-modeset|"
    r"nvidia-caps/nvidia-cap\d+)$"
)


# --- pure rules (unit-tested) ---------------------------------------------------------------


def gpu_majors(proc_devices):
    """Majors of the GPU, nvidia-uvm and nvidia-caps devices from /proc/devices (None when absent)."""
    gpu = next((proc_devices[name] for name in GPU_DEVICE_NAMES if name in proc_devices), None)
    return {"gpu": gpu, "uvm": proc_devices.get("nvidia-uvm"), "caps": proc_devices.get("nvidia-caps")}


def node_kind(path):
    if path.startswith("/dev/nvidia-uvm"):
        return "uvm"
    if path.startswith("/dev/nvidia-caps/"):
        return "caps"
    return "gpu"


def guest_nodes(nodes, majors, host_name="host"):
    """
    The device nodes to pass to a guest, sorted; a node whose major is not the one /proc/devices
    gives its device (a node left from an older driver) is refused by name.
    """
    chosen = sorted((path for path in nodes if GUEST_NODE.match(path)), key=_node_order)
    for path in chosen:
        expected = majors.get(node_kind(path))
        if expected is not None and nodes[path][0] != expected:
            raise HostStateError(
                f"{host_name}: {path} has major {nodes[path][0]} but /proc/devices gives its device major "
                f"{expected}: a node left from another driver. Run 'systemctl restart {NODES_UNIT}' "
                "(or reboot) so it is created again. Nothing was changed."
            )
    return chosen


def _node_order(path):
    """GPUs first (by number), then the control, unified-memory, modeset and capability nodes."""
    match = re.fullmatch(r"/dev/nvidia(\d+)", path)
    return (0, int(match.group(1)), "") if match else (1, 0, path.replace("nvidiactl", "nvidia-0ctl"))


def lxc_lines(majors, nodes):
    """Raw LXC lines for older Proxmox releases: cgroup2 allow per major, a bind mount per node."""
    used = sorted({majors[node_kind(path)] for path in nodes if majors.get(node_kind(path)) is not None})
    lines = [f"lxc.cgroup2.devices.allow: c {major}:* rwm" for major in used]
    lines += [f"lxc.mount.entry: {path} {path[1:]} none bind,optional,create=file" for path in nodes]
    return lines


def dev_changes(options, nodes):
    """
    ``devN`` entries (Proxmox VE 8.1+) to set and delete so the guest gets exactly ``nodes``.
    Entries of other devices (a USB stick, /dev/dri) are left alone.

    Returns ``([(key, path), ...] to set, [key, ...] to delete)``.
    """
    existing = {key: parse_property_string(value) for key, value in options.items() if re.fullmatch(r"dev\d+", key)}
    paths = {key: entry.get("path") or entry.get("") for key, entry in existing.items()}
    delete = sorted(
        (key for key, path in paths.items() if path and path.startswith("/dev/nvidia") and path not in nodes),
        key=lambda k: int(k[3:]),
    )
    have = {path for key, path in paths.items() if key not in delete}
    free = (f"dev{i}" for i in range(256) if f"dev{i}" not in existing or f"dev{i}" in delete)
    to_set = [(next(free), path) for path in nodes if path not in have]
    delete = [key for key in delete if key not in {k for k, _ in to_set}]
    return to_set, delete


def features_value(current, unprivileged):
    """The ``features`` string with what Docker inside LXC needs: nesting, and keyctl when unprivileged."""
    features = parse_property_string(current)
    features.pop("", None)
    wanted = {"nesting": "1", **({"keyctl": "1"} if unprivileged else {})}
    if all(features.get(key) == value for key, value in wanted.items()):
        return None
    features.update(wanted)
    return ",".join(f"{key}={value}" for key, value in features.items())


def conf_edit_command(conf, add, remove):
    """
    Rewrite a guest's .conf in place: drop ``remove`` lines and append ``add`` lines at the end of
    the main section (above any [snapshot] section). ``cat >`` keeps pmxcfs's file in place.
    """
    tmp = f"{conf}.gpufleet-tmp"
    return (
        f"awk -v add={shlex.quote(_awk_lines(add))} "
        f"-v del={shlex.quote(_awk_lines(remove))} {shlex.quote(CONF_EDIT)} {conf} > {tmp} && "
        f"cat {tmp} > {conf} && rm -f {tmp}"
    )


def _awk_lines(lines):
    """Lines as one awk -v value: awk turns \\n back into newlines (and \\\\ into a backslash)."""
    return "\\n".join(line.replace("\\", "\\\\") for line in lines)


# --- inventory model ------------------------------------------------------------------------


def guests_of(host_name):
    """The inventory's LXC guests whose ``proxmox_host`` is this host."""
    return [
        guest for guest in inventory.get_group("lxc_guests", default=[]) if guest.data.get("proxmox_host") == host_name
    ]


def proxmox_host_of(guest):
    """The guest's Proxmox host object; refuses a guest without one or whose host is not in this run."""
    name = guest.data.get("proxmox_host")
    vmid = guest.data.get("proxmox_vmid")
    if not name or vmid is None:
        raise ConfigError(
            "proxmox_host" if not name else "proxmox_vmid",
            "an LXC guest names its Proxmox host and VMID",
            host=guest.name,
        )
    pve = inventory.get_host(name, default=None)
    if pve is None or pve not in inventory.get_group("proxmox_hosts", default=[]):
        raise ConfigError("proxmox_host", f"{name!r} is not a host of the proxmox_hosts group", host=guest.name)
    if not pve.connected:
        raise ConfigError(
            "proxmox_host",
            f"{name} is not in this run (--limit?): the guest's driver is "
            "matched to its host's, so both are deployed together",
            host=guest.name,
        )
    return pve


def host_driver_version(pve):
    """The host's driver version: the loaded module's, else the version pinned for it."""
    module = other_hosts.fact_of(pve, NvidiaKernelModule)
    if module:
        return module["version"], "loaded kernel module"
    return pve.data.nvidia_driver_version, "pinned driver (module not loaded yet)"


def guest_driver_version(guest=None):
    """
    The version an LXC guest's libraries must have: exactly its host's. A guest pinned to another
    version is refused before anything changes.
    """
    guest = guest or host
    pve = proxmox_host_of(guest)
    version, what = host_driver_version(pve)
    pinned = guest.data.nvidia_driver_version
    if pinned != version and pinned != version.split(".")[0]:
        raise ConfigError(
            "nvidia_driver_version",
            f"pins {pinned} but its Proxmox host {pve.name} has {what} {version}; an LXC guest's "
            f"libraries must be exactly its host's version: pin {version} for the guest, or move the "
            "host first (install, reboot) and then the guest",
            host=guest.name,
        )
    return version


def guest_is_unprivileged(guest=None):
    guest = guest or host
    pve = proxmox_host_of(guest)
    conf = other_hosts.fact_of(pve, PctConfig, vmid=guest.data.proxmox_vmid)
    return bool(conf) and conf["options"].get("unprivileged") == "1"


# --- operations -----------------------------------------------------------------------------


@operation()
def guest_devices(vmid: int, nodes: list[str], syntax: str, majors: dict, record: dict):
    """
    Give guest ``vmid`` exactly ``nodes``: ``devN`` entries (``pct set``) or raw LXC lines in its
    .conf (cgroup2 allow per major + bind mounts), removing what gpufleet gave it before.

    + vmid: the container's ID
    + nodes: device node paths on the host
    + syntax: ``dev`` or ``lxc``
    + majors: from ``gpu_majors``
    + record: file on the host listing the LXC lines gpufleet wrote (so it can take them back)
    """
    conf = host.get_fact(PctConfig, vmid=vmid)
    if conf is None:
        raise HostStateError(f"{host.name}: container {vmid} does not exist (pct config {vmid} failed)")
    to_set, delete = dev_changes(conf["options"], nodes if syntax == "dev" else [])
    wanted = lxc_lines(majors, nodes) if syntax == "lxc" else []
    present = [f"{key}: {value}" for key, value in conf["lxc"]]
    owned = host.get_fact(FileContents, path=record) or []
    add = [line for line in wanted if line not in present]
    remove = [line for line in owned if line not in wanted and line in present]

    if delete:
        yield f"pct set {vmid} --delete {','.join(delete)}"
    if to_set:
        yield f"pct set {vmid} " + " ".join(f"--{key} {shlex.quote(path)}" for key, path in to_set)
    if add or remove:
        yield conf_edit_command(f"{CONF_DIR}/{int(vmid)}.conf", add, remove)
    if owned != wanted:
        yield f"mkdir -p {shlex.quote(str(Path(record).parent))}"
        yield f"printf '%s' {shlex.quote(''.join(line + chr(10) for line in wanted))} > {shlex.quote(record)}"
    if not (delete or to_set or add or remove or owned != wanted):
        host.noop(f"container {vmid} already has {len(nodes)} NVIDIA device(s) ({syntax} entries)")


@operation()
def guest_features(vmid: int, unprivileged: bool):
    """
    Turn on the features Docker inside an LXC guest needs (nesting; keyctl when unprivileged),
    keeping the others.
    """
    conf = host.get_fact(PctConfig, vmid=vmid) or {"options": {}}
    value = features_value(conf["options"].get("features"), unprivileged)
    if value is None:
        host.noop(f"container {vmid} already has nesting{' and keyctl' if unprivileged else ''}")
        return
    yield f"pct set {vmid} --features {value}"


@deploy("Prepare Proxmox VE host for GPU passthrough", data_defaults=settings.DEFAULTS)
def prepare_host():
    """
    Load ``nvidia`` and ``nvidia_uvm`` at boot and create every device node before guests start
    (``gpufleet-nvidia-device-nodes.service``, ordered before ``pve-guests.service``). The headers
    DKMS builds against come with the driver (``proxmox-headers-<running kernel>``).
    """
    if host.get_fact(PveVersion) is None:
        raise HostStateError(f"{host.name}: in group proxmox_hosts but pveversion is missing: not a Proxmox VE host")
    files.put(
        name="Load nvidia and nvidia_uvm at boot", src=StringIO("nvidia\nnvidia_uvm\n"), dest=MODULES_LOAD, mode="644"
    )
    script = files.put(
        name="Install the device node script",
        src=str(TEMPLATES / NODES_UNIT),
        dest=f"{TOOLS_DIR}/{NODES_UNIT}",
        mode="755",
    )
    unit = files.put(
        name=f"Install {NODES_UNIT}.service",
        src=StringIO(
            "[Unit]\nDescription=gpufleet: NVIDIA device nodes for LXC passthrough\n"
            "After=systemd-modules-load.service\nBefore=pve-guests.service\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"ExecStart={TOOLS_DIR}/{NODES_UNIT}\n\n"
            "[Install]\nWantedBy=multi-user.target\n"
        ),
        dest=f"/etc/systemd/system/{NODES_UNIT}.service",
        mode="644",
    )
    systemd.daemon_reload(name="Reload systemd after the device node unit changed", _if=unit.did_change)
    has_gpu = bool(devices.gpus())
    if has_gpu:
        systemd.service(
            name=f"Restart {NODES_UNIT} after it changed",
            service=f"{NODES_UNIT}.service",
            restarted=True,
            _if=any_changed(script, unit),
        )
    systemd.service(
        name=f"Enable {NODES_UNIT}", service=f"{NODES_UNIT}.service", enabled=True, running=True if has_gpu else None
    )


@deploy("Pass NVIDIA devices to LXC guests")
def configure_guests():
    """
    For every guest naming this host: its device entries (``devN`` on Proxmox VE 8.1+, raw LXC lines
    before it or when ``proxmox_passthrough = "lxc"``) and the features Docker needs.

    Returns ``[(guest, [operations that changed its config])]`` for ``restart_guests``.
    """
    majors = gpu_majors(host.get_fact(ProcDevices))
    release = host.get_fact(PveVersion)["release"]
    results = []
    for guest in guests_of(host.name):
        vmid = int(guest.data.proxmox_vmid)
        conf = host.get_fact(PctConfig, vmid=vmid)
        if conf is None:
            raise HostStateError(f"{guest.name}: container {vmid} does not exist on {host.name}")
        unprivileged = conf["options"].get("unprivileged") == "1"
        changed = []
        if majors["gpu"] is None:
            logger.warning(
                f"[{host.name}] /proc/devices lists no NVIDIA device (module not loaded: reboot "
                f"after the driver install): container {vmid} gets no GPU this run"
            )
        else:
            nodes = guest_nodes(host.get_fact(NvidiaDeviceNodes), majors, host.name)
            syntax = guest.data.get("proxmox_passthrough") or "auto"
            if syntax == "auto":
                syntax = "dev" if release >= (8, 1) else "lxc"
            changed.append(
                guest_devices(
                    name=f"Pass {len(nodes)} NVIDIA device node(s) to container {vmid} ({syntax} entries)",
                    vmid=vmid,
                    nodes=nodes,
                    syntax=syntax,
                    majors=majors,
                    record=f"{host.data.get('gpufleet_state_dir') or settings.DEFAULTS['gpufleet_state_dir']}"
                    f"/proxmox/{vmid}.lxc-lines",
                )
            )
        if guest.data.get("proxmox_docker_features", True):
            changed.append(
                guest_features(
                    name=f"Enable nesting{', keyctl' if unprivileged else ''} for container {vmid}",
                    vmid=vmid,
                    unprivileged=unprivileged,
                )
            )
        results.append((guest, changed))
    return results


@deploy("Restart LXC guests whose config changed")
def restart_guests(results: list):
    """
    Restart a running guest whose passthrough or features changed, when its ``proxmox_guest_restart``
    allows it; otherwise say it needs one. Runs last, after the guest's own steps.
    """
    for guest, changed in results:
        vmid = int(guest.data.proxmox_vmid)
        running = host.get_fact(PctStatus, vmid=vmid) == "running"
        if running and guest.data.get("proxmox_guest_restart"):
            server.shell(
                name=f"Restart container {vmid} ({guest.name}) to apply its new devices",
                commands=[f"pct reboot {vmid}"],
                _if=any_changed(*changed),
            )
            continue
        # What follows is said, not done: up front, from what the operations above will change.
        if not any(op.will_change for op in changed):
            continue
        if not running:
            logger.info(f"[{host.name}] container {vmid} is not running: its new config applies at its next start")
        else:
            logger.warning(
                f"[{host.name}] container {vmid} ({guest.name}) needs a restart to see its new "
                f"devices: run 'pct reboot {vmid}', or set proxmox_guest_restart = True for it"
            )
