"""Proxmox VE LXC passthrough: the host loads the module at boot, creates the device nodes before its
guests start and passes every NVIDIA node to each guest; a guest has user-space libraries only, at
its host's version, and a toolkit that leaves device cgroups to the host when unprivileged."""

import re

import pytest

from operations.proxmox.facts import parse_pct_config
from tests.checks.meant import only_where


@pytest.fixture
def proxmox_host(host, intent):
    return only_where(host, "lxc_guests" in intent, "not a Proxmox VE host")


@pytest.fixture
def guest(host, intent):
    return only_where(host, "lxc" in intent, "not an LXC guest")


def test_modules_load_at_boot(proxmox_host):
    modules = proxmox_host.file("/etc/modules-load.d/gpufleet-nvidia.conf").content_string.split()
    assert modules == ["nvidia", "nvidia_uvm"]


def test_device_nodes_created_before_guests_start(proxmox_host):
    unit = proxmox_host.file("/etc/systemd/system/gpufleet-nvidia-device-nodes.service").content_string
    assert "Before=pve-guests.service" in unit
    assert proxmox_host.service("gpufleet-nvidia-device-nodes").is_enabled


def test_every_guest_gets_every_nvidia_node(proxmox_host, intent):
    nodes = proxmox_host.check_output("ls -d /dev/nvidia[0-9]* /dev/nvidiactl /dev/nvidia-uvm* 2>/dev/null").split()
    assert nodes, "no NVIDIA device nodes on the Proxmox host"
    for vmid in intent["lxc_guests"]:
        conf = parse_pct_config(proxmox_host.check_output(f"pct config {vmid}").splitlines())
        passed = {
            value.split(",")[0].removeprefix("path=")
            for key, value in conf["options"].items()
            if re.fullmatch(r"dev\d+", key)
        }
        passed |= {value.split()[0] for key, value in conf["lxc"] if key == "lxc.mount.entry"}
        assert set(nodes) <= passed, (vmid, sorted(set(nodes) - passed))
        features = conf["options"].get("features", "")
        assert "nesting=1" in features, (vmid, features)


def test_guest_has_no_kernel_module_package(guest):
    for name in ("nvidia-kernel-dkms", "nvidia-open-kernel-dkms"):
        assert not guest.package(name).is_installed, name


def test_guest_toolkit_leaves_cgroups_to_the_host(guest, intent):
    if not intent["lxc"]["unprivileged"]:
        pytest.skip("a privileged guest: the toolkit manages device cgroups itself")
    config = guest.file("/etc/nvidia-container-runtime/config.toml").content_string
    section = config.split("[nvidia-container-cli]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^no-cgroups = true$", section, re.M)
