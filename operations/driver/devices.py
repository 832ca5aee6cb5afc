"""Facts about NVIDIA hardware and the driver, parsed from what the host really prints."""

import posixpath
import re

from pyinfra.api import FactBase

from operations.core import host_memo
from operations.driver.facts import release_key

NVIDIA_PCI_VENDOR = "0x10de"


class NvidiaPciDevices(FactBase):
    """
    Returns NVIDIA PCI functions from /sys (vendor 0x10de), display controllers and NVSwitches:

    .. code:: python

        [{"slot": "0000:00:06.0", "class": "0x030200", "device": "0x2330", "kind": "gpu"}]
    """

    default = list

    def command(self):
        return (
            "for d in /sys/bus/pci/devices/*; do "
            f'[ "$(cat $d/vendor 2>/dev/null)" = {NVIDIA_PCI_VENDOR} ] && '
            'echo "${d##*/} $(cat $d/class) $(cat $d/device)"; '
            "done; true"
        )

    def process(self, output):
        devices = []
        for line in output:
            slot, pci_class, device = line.split()
            if pci_class.startswith("0x03"):
                kind = "gpu"
            elif pci_class.startswith("0x0680"):
                kind = "nvswitch"
            else:
                continue  # the HDMI audio function of consumer boards
            devices.append({"slot": slot, "class": pci_class, "device": device, "kind": kind})
        return devices


class NvidiaSmi(FactBase):
    """
    Returns what ``nvidia-smi`` reports, or why it could not (exit code and message):

    .. code:: python

        {"ok": True, "gpus": [{"driver_version": "580.159.04", "name": "NVIDIA H100 80GB HBM3",
                               "bus_id": "00000000:00:06.0", "memory_mib": 81559}]}
        {"ok": False, "rc": 9, "message": "NVIDIA-SMI has failed because it couldn't communicate ..."}
        {"ok": False, "rc": 127, "message": "nvidia-smi: not installed"}
    """

    def command(self):
        return (
            "if command -v nvidia-smi >/dev/null; then "
            "nvidia-smi --query-gpu=driver_version,name,pci.bus_id,memory.total "
            '--format=csv,noheader,nounits 2>&1; echo "rc=$?"; '
            "else echo 'nvidia-smi: not installed'; echo rc=127; fi"
        )

    def process(self, output):
        rc = int(output[-1].split("=", 1)[1])
        lines = output[:-1]
        if rc != 0:
            return {"ok": False, "rc": rc, "message": " ".join(line.strip() for line in lines)}
        gpus = []
        for line in lines:
            version, name, bus_id, memory = [part.strip() for part in line.split(",")]
            gpus.append({"driver_version": version, "name": name, "bus_id": bus_id, "memory_mib": int(memory)})
        return {"ok": True, "gpus": gpus}


class NvidiaKernelModule(FactBase):
    """
    Returns the loaded NVIDIA kernel module's version from /proc/driver/nvidia/version, or None:

    .. code:: python

        {"version": "580.159.04", "open": True}
    """

    def command(self):
        return "cat /proc/driver/nvidia/version 2>/dev/null; true"

    def process(self, output):
        for line in output:
            match = re.match(r"NVRM version: NVIDIA UNIX Open Kernel Module for \S+\s+(\S+)", line)
            if match:
                return {"version": match.group(1), "open": True}
            match = re.match(r"NVRM version: NVIDIA UNIX \S+ Kernel Module\s+(\S+)", line)
            if match:
                return {"version": match.group(1), "open": False}
        return None


class SecureBoot(FactBase):
    """
    Returns True/False for the Secure Boot state, or None on a machine without EFI.

    Reads ``mokutil --sb-state`` ("SecureBoot enabled"; off when it adds "SecureBoot validation is
    disabled in shim"), falling back to the EFI variable.
    """

    def command(self):
        return (
            "if command -v mokutil >/dev/null; then mokutil --sb-state 2>&1; "
            "elif [ -d /sys/firmware/efi ]; then "
            "f=$(ls /sys/firmware/efi/efivars/SecureBoot-* 2>/dev/null | head -n1); "
            '[ -n "$f" ] && echo "efivar $(od -An -t u1 "$f" | awk \'{print $NF}\')" || echo "efivar none"; '
            "else echo 'no efi'; fi; true"
        )

    def process(self, output):
        text = " ".join(output)
        if "validation is disabled in shim" in text:
            return False  # shim in insecure mode: Linux boots with Secure Boot off (module signatures unchecked)
        if "SecureBoot enabled" in text or text.strip() == "efivar 1":
            return True
        if "SecureBoot disabled" in text or text.strip() == "efivar 0":
            return False
        return None


class DkmsStatus(FactBase):
    """
    Returns DKMS modules from ``dkms status`` (both the 2.x and 3.x layouts):

    .. code:: python

        [{"module": "nvidia-current", "version": "535.261.03", "kernel": "6.1.0-28-amd64",
          "arch": "amd64", "state": "installed"}]
    """

    default = list

    def command(self):
        return "dkms status 2>/dev/null; true"

    def process(self, output):
        modules = []
        for line in output:
            if ":" not in line:
                continue
            head, state = line.rsplit(":", 1)
            parts = [part.strip() for part in head.split(",")]
            if "/" in parts[0]:  # dkms 3: "nvidia-current/535.261.03, 6.1.0-28-amd64, amd64: installed"
                module, version = parts[0].split("/", 1)
                rest = parts[1:]
            else:  # dkms 2: "nvidia, 535.54.03, 5.15.0-76-generic, x86_64: installed"
                module, version, rest = parts[0], parts[1], parts[2:]
            modules.append(
                {
                    "module": module,
                    "version": version,
                    "kernel": rest[0] if rest else None,
                    "arch": rest[1] if len(rest) > 1 else None,
                    "state": state.strip().split()[0] if state.strip() else "",
                }
            )
        return modules


class KernelHeaders(FactBase):
    """
    Returns the running kernel and whether its headers (the DKMS build tree) are installed:

    .. code:: python

        {"kernel": "6.1.0-28-amd64", "headers": True}
    """

    def command(self):
        return 'k=$(uname -r); echo "$k"; [ -d "/lib/modules/$k/build" ] && echo yes || echo no'

    def process(self, output):
        return {"kernel": output[0].strip(), "headers": output[1].strip() == "yes"}


class InstalledKernels(FactBase):
    """
    Returns the kernels under /lib/modules: whether each can boot (``/boot/vmlinuz-<release>``) and
    whether its headers (DKMS's build tree) are there:

    .. code:: python

        {"6.1.0-56-amd64": {"image": True, "headers": True}, "6.1.0-57-amd64": {"image": True, "headers": False}}
    """

    default = dict

    def command(self):
        return (
            'for d in /lib/modules/*; do [ -d "$d" ] || continue; k=${d##*/}; '
            'echo "$k $([ -e "/boot/vmlinuz-$k" ] && echo image || echo none) '
            '$([ -d "$d/build" ] && echo headers || echo none)"; done; true'
        )

    def process(self, output):
        found = {}
        for line in output:
            parts = line.split()
            if len(parts) == 3:
                found[parts[0]] = {"image": parts[1] == "image", "headers": parts[2] == "headers"}
        return found


def next_boot(kernels, running):
    """The kernel the host boots next: its newest bootable one (a boot loader's default), else the running one."""
    bootable = [release for release, kernel in kernels.items() if kernel["image"]]
    return max(bootable, key=release_key) if bootable else running


class NvidiaDeviceNodes(FactBase):
    """
    Returns the NVIDIA character device nodes under /dev with their major and minor numbers:

    .. code:: python

        {"/dev/nvidia0": (195, 0), "/dev/nvidiactl": (195, 255), "/dev/nvidia-uvm": (238, 0)}
    """

    default = dict

    def command(self):
        return 'for f in /dev/nvidia* /dev/nvidia-caps/*; do [ -c "$f" ] && stat -c "%n %t %T" "$f"; done; true'

    def process(self, output):
        nodes = {}
        for line in output:
            path, major, minor = line.split()
            nodes[path] = (int(major, 16), int(minor, 16))
        return nodes


class DevCharLinks(FactBase):
    """
    Returns the symlinks in /dev/char, by ``MAJOR:MINOR``, with their targets made absolute (runc
    finds a device by them when systemd manages the container's cgroup):

    .. code:: python

        {"195:0": "/dev/nvidia0", "4:1": "/dev/tty1"}
    """

    default = dict

    def command(self):
        return "find /dev/char -maxdepth 1 -type l -printf '%f %l\\n' 2>/dev/null; true"

    def process(self, output):
        links = {}
        for line in output:
            name, _, target = line.partition(" ")
            links[name] = posixpath.normpath(posixpath.join("/dev/char", target))
        return links


# The nodes ``nvidia-ctk system create-dev-char-symlinks`` links (1.17.8, cmd/nvidia-ctk/system/
# create-dev-char-symlinks: all.go links the GPUs, nvidiactl, nvidia-modeset, nvidia-uvm(-tools) and
# the MIG caps; existing.go skips nvidia-fs*, nvidia-nvswitch* and nvidia-nvlink*). An NVSwitch's
# node never gets a link, so it must not count as missing one. Source: tests/data/upstream/.
LINKED_BY_NVIDIA_CTK = re.compile(
    r"/dev/(nvidia\d+|nvidiactl|nvidia-modeset|nvidia-uvm|nvidia-uvm-tools|nvidia-caps/nvidia-cap\d+)"
)


def linked_by_nvidia_ctk(nodes):
    """Of the device nodes (path -> (major, minor)), those nvidia-ctk gives a /dev/char link."""
    return {path: numbers for path, numbers in nodes.items() if LINKED_BY_NVIDIA_CTK.fullmatch(path)}


def missing_dev_char_links(nodes, links):
    """The device nodes (path -> (major, minor)) that have no /dev/char/MAJOR:MINOR link to them."""
    return sorted(path for path, (major, minor) in nodes.items() if links.get(f"{major}:{minor}") != path)


def gpus():
    """The NVIDIA GPUs this host really has (PCI vendor 0x10de, display class)."""
    return [device for device in host_memo.fact(NvidiaPciDevices) if device["kind"] == "gpu"]
