"""Facts of a Proxmox VE host and its LXC guests, parsed from what the tools really print."""

import re

from pyinfra.api import FactBase

# The GPU's character device is "nvidia" from driver 550.40 and "nvidia-frontend" before it.
GPU_DEVICE_NAMES = ("nvidia", "nvidia-frontend")


def parse_proc_devices(lines):
    """{name: major} of the character devices in /proc/devices (block devices left out)."""
    majors = {}
    section = None
    for line in lines:
        line = line.strip()
        if line.endswith("devices:"):
            section = line.split()[0].lower()
            continue
        match = re.fullmatch(r"(\d+)\s+(\S+)", line)
        if match and section == "character":
            majors.setdefault(match.group(2), int(match.group(1)))
    return majors


def parse_pct_config(lines):
    """
    ``pct config VMID`` (or the main section of /etc/pve/lxc/VMID.conf) as
    ``{"options": {key: value}, "lxc": [(key, value), ...], "description": str}``.

    pct prints ``key: value`` lines sorted by key, then the raw ``lxc.*`` lines in file order; the
    .conf file puts the description first as ``#`` lines and snapshots after as ``[name]`` sections.
    """
    options, lxc, description = {}, [], []
    for line in lines:
        if line.startswith("["):
            break  # a snapshot or pending section: not the container's current config
        if line.startswith("#"):
            description.append(line[1:])
            continue
        match = re.match(r"^(lxc\.[a-z0-9_.\-]+)(?::|\s*=)\s*(.*?)\s*$", line)
        if match:
            lxc.append((match.group(1), match.group(2)))
            continue
        match = re.match(r"^([a-z][a-z_-]*\d*):\s*(.*?)\s*$", line)
        if match:
            options[match.group(1)] = match.group(2)
    return {"options": options, "lxc": lxc, "description": "\n".join(description)}


def parse_property_string(value):
    """Proxmox's ``key=value,key=value`` strings, with an unnamed first item under ``default_key``."""
    result = {}
    for index, item in enumerate(filter(None, (value or "").split(","))):
        key, sep, val = item.partition("=")
        if sep:
            result[key.strip()] = val.strip()
        elif index == 0:
            result[""] = key.strip()
    return result


class ProcDevices(FactBase):
    """
    Returns the character devices of /proc/devices by name (majors of dynamic devices included):

    .. code:: python

        {"nvidia": 195, "nvidiactl": 195, "nvidia-uvm": 238, "nvidia-caps": 241}
    """

    default = dict

    def command(self):
        return "cat /proc/devices"

    def process(self, output):
        return parse_proc_devices(output)


class PveVersion(FactBase):
    """
    Returns Proxmox VE's version from ``pveversion``, or None on a host that is not Proxmox VE:

    .. code:: python

        {"version": "8.2.4", "release": (8, 2), "kernel": "6.8.12-1-pve"}
    """

    def command(self):
        return "command -v pveversion >/dev/null && pveversion; true"

    def process(self, output):
        for line in output:
            match = re.match(r"pve-manager/(\d+)\.(\d+)[.-](\S+?)/\S+(?:\s+\(running kernel: (\S+)\))?", line)
            if match:
                major, minor, rest = match.group(1), match.group(2), match.group(3)
                return {
                    "version": f"{major}.{minor}.{rest}",
                    "release": (int(major), int(minor)),
                    "kernel": match.group(4),
                }
        return None


class PctConfig(FactBase):
    """
    Returns a container's configuration as ``pct config VMID`` prints it (see ``parse_pct_config``),
    or None when the container does not exist.
    """

    def command(self, vmid):
        return f"pct config {int(vmid)} 2>/dev/null || echo '#gpufleet: no such container'"

    def process(self, output):
        if output and output[-1] == "#gpufleet: no such container":
            return None
        return parse_pct_config(output)


class PctStatus(FactBase):
    """Returns a container's state from ``pct status VMID`` ("running", "stopped"), or None."""

    def command(self, vmid):
        return f"pct status {int(vmid)} 2>/dev/null; true"

    def process(self, output):
        for line in output:
            if line.startswith("status:"):
                return line.split(":", 1)[1].strip()
        return None
