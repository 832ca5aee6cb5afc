"""Proxmox LXC passthrough on the lab: lab-pve-1 plays the Proxmox VE host (test doubles of pct,
/etc/pve and a loaded module's /proc/devices and nodes: tests/fixtures/proxmox_double), lab-ct-1
plays its guest 101. Both syntaxes, majors from /proc/devices, idempotency, the version lock."""

import hashlib
import re

import pytest

from operations import TOOLS_DIR
from operations.proxmox.facts import parse_pct_config, parse_proc_devices
from tests.e2e.conftest import run_deploy
from tests.fixtures import proxmox_double
from tests.fixtures.proxmox_double import HERE as DOUBLE
from tests.lab import hosts as lab_hosts

PAIR = ["--limit", "lab-pve-1", "--limit", "lab-ct-1"]
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0"
NODE_SCRIPT = f"{TOOLS_DIR}/gpufleet-nvidia-device-nodes"


def sh(lab, name, command):
    return lab_hosts.ssh(lab[name], command).stdout


def conf_text(lab):
    return sh(lab, "lab-pve-1", "cat /etc/pve/lxc/101.conf")


def host_nodes(lab):
    """The NVIDIA nodes on the Proxmox host, GPUs first (as the double created them)."""
    return sh(lab, "lab-pve-1", "ls -d /dev/nvidia[0-9]* /dev/nvidiactl /dev/nvidia-caps/* /dev/nvidia-uvm*").split()


def reboots(lab):
    return sh(lab, "lab-pve-1", "grep -c '^pct reboot 101$' /var/log/gpufleet-pct-double.log || true").strip()


def module_version(lab):
    """The version of the NVIDIA module the double has "loaded" (/proc/driver/nvidia/version)."""
    return sh(lab, "lab-pve-1", "cat /proc/driver/nvidia/version").split("Kernel Module")[1].split()[0]


def built_for(lab, kernel):
    """The version of Debian's NVIDIA module (nvidia-current) built for ``kernel``, empty when none is."""
    return sh(lab, "lab-pve-1", f"modinfo -k {kernel} -F version nvidia-current 2>/dev/null || true").strip()


def installed(lab, pattern):
    """The installed packages whose names match a grep -E pattern."""
    out = sh(lab, "lab-pve-1", "dpkg-query -W -f '${db:Status-Abbrev} ${Package}\\n'")
    return [
        name
        for status, name in (line.split() for line in out.splitlines())
        if status[1] == "i" and re.search(pattern, name)
    ]


def nvidia_devs(conf):
    return {
        key: value
        for key, value in conf["options"].items()
        if re.fullmatch(r"dev\d+", key) and value.startswith("/dev/nvidia")
    }


def test_guest_gets_dev_entries_for_every_node(second_deploy, lab):
    conf = parse_pct_config(conf_text(lab).splitlines())
    assert sorted(nvidia_devs(conf).values()) == sorted(host_nodes(lab))
    assert conf["lxc"] == []
    assert conf["options"]["features"] == "fuse=1,nesting=1,keyctl=1"  # fuse kept, keyctl: unprivileged


def test_snapshot_sections_untouched(second_deploy, lab):
    original = (DOUBLE / "101.conf").read_text()
    assert conf_text(lab).split("\n[before-gpu]\n")[1] == original.split("\n[before-gpu]\n")[1]


def test_guest_restarted_once_across_two_runs(second_deploy, lab):
    assert reboots(lab) == "1"
    assert "Restart container 101" not in str(second_deploy.changed())


def test_guest_libraries_match_the_host_module(second_deploy, lab):
    module = module_version(lab)
    query = sh(
        lab,
        "lab-ct-1",
        "dpkg-query -W -f '${Package} ${Version}\\n' nvidia-smi libcuda1 nvidia-kernel-dkms 2>/dev/null; true",
    )
    versions = dict(line.split() for line in query.splitlines() if len(line.split()) == 2)
    assert versions["nvidia-smi"].startswith(module + "-") and versions["libcuda1"].startswith(module + "-")
    assert "nvidia-kernel-dkms" not in versions  # the host owns the kernel module
    assert {"nvidia-smi", "libcuda1"} <= set(sh(lab, "lab-ct-1", "apt-mark showhold").split())


def test_unprivileged_guest_toolkit_has_no_cgroups(second_deploy, lab):
    config = sh(lab, "lab-ct-1", "cat /etc/nvidia-container-runtime/config.toml")
    section = config.split("[nvidia-container-cli]\n", 1)[1].split("\n[", 1)[0]
    assert "no-cgroups = true" in section.splitlines()


def test_device_node_unit_enabled_not_started_without_gpu(second_deploy, lab):
    assert sh(lab, "lab-pve-1", "systemctl is-enabled gpufleet-nvidia-device-nodes").strip() == "enabled"
    assert sh(lab, "lab-pve-1", "systemctl is-active gpufleet-nvidia-device-nodes || true").strip() == "inactive"
    assert sh(lab, "lab-pve-1", "cat /etc/modules-load.d/gpufleet-nvidia.conf").split() == ["nvidia", "nvidia_uvm"]


def test_guest_pinned_to_another_version_is_refused_before_any_change(second_deploy, lab):
    before = hashlib.sha256(conf_text(lab).encode()).hexdigest()
    packages = sh(lab, "lab-ct-1", "dpkg-query -W nvidia-smi")
    result = run_deploy(*PAIR, "--data", "nvidia_driver_version=535.309.01")
    assert result.rc != 0
    assert "lab-ct-1: nvidia_driver_version: pins 535.309.01 but its Proxmox host lab-pve-1" in result.output
    assert "Starting operation" not in result.output
    assert hashlib.sha256(conf_text(lab).encode()).hexdigest() == before
    assert sh(lab, "lab-ct-1", "dpkg-query -W nvidia-smi") == packages


def test_guest_without_its_host_in_the_run_is_refused(second_deploy, lab):
    result = run_deploy("--limit", "lab-ct-1")
    assert result.rc != 0
    assert "lab-ct-1: proxmox_host: lab-pve-1 is not in this run" in result.output


@pytest.fixture(scope="module")
def lxc_syntax(second_deploy, lab):
    """Switch guest 101 to raw LXC lines, run again, then switch back to devN entries."""
    reboots_before = int(reboots(lab))
    first = run_deploy(*PAIR, "--data", "proxmox_passthrough=lxc")
    conf = conf_text(lab)
    again = run_deploy(*PAIR, "--data", "proxmox_passthrough=lxc")
    reboots_lxc = int(reboots(lab))
    back = run_deploy(*PAIR)
    return {
        "first": first,
        "conf": conf,
        "again": again,
        "back": back,
        "reboots": (reboots_before, reboots_lxc),
        "conf_back": conf_text(lab),
    }


def test_lxc_syntax_writes_exact_lines_with_majors_from_proc_devices(lxc_syntax, lab):
    assert lxc_syntax["first"].rc == 0, lxc_syntax["first"].output[-3000:]
    majors = parse_proc_devices(sh(lab, "lab-pve-1", "cat /proc/devices").splitlines())
    gpu, uvm, caps = majors["nvidia-frontend"], majors["nvidia-uvm"], majors["nvidia-caps"]  # driver 535
    nodes = host_nodes(lab)
    expected = [f"lxc.cgroup2.devices.allow: c {major}:* rwm" for major in sorted({gpu, uvm, caps})]
    expected += [
        f"lxc.mount.entry: {node} {node[1:]} none bind,optional,create=file"
        for node in sorted(
            nodes, key=lambda n: (not re.fullmatch(r"/dev/nvidia\d+", n), n.replace("nvidiactl", "nvidia-0ctl"))
        )
    ]
    main = lxc_syntax["conf"].split("\n[")[0].splitlines()
    assert [line for line in main if line.startswith("lxc.")] == expected
    assert nvidia_devs(parse_pct_config(main)) == {}  # the devN entries gpufleet wrote are gone


def test_lxc_syntax_second_run_changes_nothing(lxc_syntax):
    assert lxc_syntax["again"].rc == 0
    assert lxc_syntax["again"].total_changed() == 0, lxc_syntax["again"].changed()


def test_switching_back_removes_lxc_lines_and_restores_dev_entries(lxc_syntax, lab):
    assert lxc_syntax["back"].rc == 0, lxc_syntax["back"].output[-3000:]
    conf = parse_pct_config(lxc_syntax["conf_back"].splitlines())
    assert conf["lxc"] == []
    assert sorted(nvidia_devs(conf).values()) == sorted(host_nodes(lab))
    before, after_lxc = lxc_syntax["reboots"]
    assert after_lxc == before + 1  # one restart for the switch, none for the no-op run
    assert int(reboots(lab)) == after_lxc + 1


def test_a_new_proxmox_kernel_brings_its_headers_and_module_and_boots_with_its_devices(second_deploy, lab):
    """Proxmox's kernel records (tests/fixtures/proxmox_double/kernels.py): the host runs 6.8.12-42-pve;
    the repository publishes 6.8.12-43-pve and an upgrade brings it; its headers come with
    proxmox-default-headers (installed by the deploy) and DKMS's kernel hook builds the module, so the
    next run has nothing to do; the host "boots" it, the module "loads" because it is built for it, and
    the device-node script finds its majors and makes the nodes guests need."""
    running, upcoming = proxmox_double.KERNELS
    version = module_version(lab)
    assert sh(lab, "lab-pve-1", "uname -r").strip() == running
    assert "proxmox-default-headers" in installed(lab, "^proxmox-")

    proxmox_double.publish("gpufleet-lab-pve-1", proxmox_double.KERNELS)
    sh(lab, "lab-pve-1", f"{APT} install --only-upgrade proxmox-kernel-6.8 proxmox-headers-6.8 proxmox-default-headers")
    assert {f"proxmox-kernel-{upcoming}", f"proxmox-headers-{upcoming}"} <= set(installed(lab, "^proxmox-"))
    assert built_for(lab, upcoming) == version  # DKMS's hook, at the kernel's postinst: its headers were there

    before_boot = run_deploy(*PAIR)
    assert before_boot.rc == 0 and before_boot.total_changed() == 0, before_boot.changed()

    assert proxmox_double.boot("gpufleet-lab-pve-1", upcoming) == f"booted {upcoming}: NVIDIA module {version}"
    assert sh(lab, "lab-pve-1", "pveversion").strip().endswith(f"(running kernel: {upcoming})")
    assert sh(lab, "lab-pve-1", "ls /dev | grep -c '^nvidia' || true").strip() == "0"  # a fresh /dev
    nodes = sh(lab, "lab-pve-1", f"GPUFLEET_NO_MODPROBE=1 {NODE_SCRIPT}")
    assert "NVIDIA device nodes ready: 0 GPU(s), major 195, nvidia-uvm 237" in nodes, nodes
    assert sh(lab, "lab-pve-1", "stat -c '%F %t:%T' /dev/nvidiactl /dev/nvidia-uvm").split("\n")[:2] == [
        "character special file c3:ff",
        "character special file ed:0",
    ]

    proxmox_double.settle("gpufleet-lab-pve-1", version)  # the GPU's own node and the caps nodes, as before
    after_boot = run_deploy(*PAIR)
    assert after_boot.rc == 0 and after_boot.total_changed() == 0, after_boot.changed()


def test_a_kernel_booted_without_its_module_leaves_no_nvidia_majors(second_deploy, lab):
    """The control for the boot above: the double loads the module only for a kernel it is built for,
    and without it the device-node script fails, naming what is missing (as a guest would not start)."""
    current = sh(lab, "lab-pve-1", "uname -r").strip()
    version = module_version(lab)
    try:
        assert proxmox_double.boot("gpufleet-lab-pve-1", "6.8.12-41-pve").endswith(
            "not loaded: none built for this kernel"
        )
        failed = lab_hosts.ssh(lab["lab-pve-1"], f"GPUFLEET_NO_MODPROBE=1 {NODE_SCRIPT}", check=False)
        assert failed.returncode == 1
        assert "no nvidia device in /proc/devices: is the NVIDIA kernel module loaded?" in failed.stderr
    finally:
        proxmox_double.boot("gpufleet-lab-pve-1", current)
        proxmox_double.settle("gpufleet-lab-pve-1", version)
