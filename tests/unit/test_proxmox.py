"""Proxmox LXC passthrough: parsing /proc/devices, pct config, pveversion; the lines and pct
commands a guest's passthrough takes; the device node script; the guest's user-space driver."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from operations.core.errors import ConfigError, HostStateError
from operations.driver import plan as driver_plan
from operations.driver.devices import NvidiaDeviceNodes
from operations.proxmox import passthrough as proxmox
from operations.proxmox.facts import (
    PctConfig,
    PctStatus,
    ProcDevices,
    PveVersion,
    parse_pct_config,
    parse_property_string,
)
from operations.toolkit import install as nvidia_toolkit

DATA = Path(__file__).resolve().parents[1] / "data"
REPO = Path(__file__).resolve().parents[2]
DOUBLE_DIR = REPO / "tests" / "fixtures" / "proxmox_double"
H100_DEVICES = (DATA / "nvidia" / "h100-proc-devices.txt").read_text().splitlines()


def lines(name):
    return (DATA / "proxmox" / name).read_text().splitlines()


def test_proc_devices_of_a_real_h100_host():
    majors = ProcDevices().process(H100_DEVICES)
    assert (majors["nvidia"], majors["nvidia-uvm"], majors["nvidia-caps"]) == (195, 238, 241)
    assert "virtblk" not in majors and "blkext" not in majors  # block devices are left out
    assert proxmox.gpu_majors(majors) == {"gpu": 195, "uvm": 238, "caps": 241}


def test_gpu_major_under_its_pre_550_name():
    majors = ProcDevices().process(
        ["Character devices:", "195 nvidia-frontend", "509 nvidia-uvm", "", "Block devices:", "195 notnvidia"]
    )
    assert proxmox.gpu_majors(majors) == {"gpu": 195, "uvm": 509, "caps": None}
    assert proxmox.gpu_majors(ProcDevices().process(["Character devices:", "  1 mem"]))["gpu"] is None


def test_pveversion_8_and_7():
    assert PveVersion().process(lines("pveversion-8.2.txt")) == {
        "version": "8.2.4",
        "release": (8, 2),
        "kernel": "6.8.12-1-pve",
    }
    assert PveVersion().process(lines("pveversion-7.4.txt"))["release"] == (7, 4)
    assert PveVersion().process([]) is None


def test_pct_config_output():
    conf = PctConfig().process(lines("pct-config-101.txt"))
    assert conf["options"]["unprivileged"] == "1"
    assert conf["options"]["dev0"] == "/dev/dri/renderD128,gid=104"
    assert conf["lxc"][1] == ("lxc.cgroup2.devices.allow", "c 508:* rwm")
    assert conf["lxc"][3] == ("lxc.mount.entry", "/dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file")
    assert PctConfig().process(["#gpufleet: no such container"]) is None


def test_conf_file_main_section_only():
    conf = parse_pct_config(lines("101.conf"))
    assert conf["description"] == "LLM guest%3A llama.cpp in Docker"
    assert "snaptime" not in conf["options"]  # the [before-upgrade] snapshot is not the current config
    assert conf["lxc"] == [
        ("lxc.cgroup2.devices.allow", "c 195:* rwm"),
        ("lxc.mount.entry", "/dev/nvidia0 dev/nvidia0 none bind,optional,create=file"),
    ]


def test_property_strings():
    assert parse_property_string("/dev/nvidia0,gid=44,mode=0660") == {"": "/dev/nvidia0", "gid": "44", "mode": "0660"}
    assert parse_property_string("path=/dev/nvidia0")["path"] == "/dev/nvidia0"


def test_device_nodes_and_status_parse():
    nodes = NvidiaDeviceNodes().process(["/dev/nvidia0 c3 0", "/dev/nvidiactl c3 ff", "/dev/nvidia-uvm ee 0"])
    assert nodes == {"/dev/nvidia0": (195, 0), "/dev/nvidiactl": (195, 255), "/dev/nvidia-uvm": (238, 0)}
    assert PctStatus().process(["status: running"]) == "running"


H100_NODES = {
    "/dev/nvidia0": (195, 0),
    "/dev/nvidia1": (195, 1),
    "/dev/nvidiactl": (195, 255),
    "/dev/nvidia-uvm": (238, 0),
    "/dev/nvidia-uvm-tools": (238, 1),
    "/dev/nvidia-caps/nvidia-cap1": (241, 1),
    "/dev/nvidia-nvswitchctl": (239, 0),
}
H100_MAJORS = {"gpu": 195, "uvm": 238, "caps": 241}


def test_guest_nodes_gpus_first_and_no_nvswitch():
    assert proxmox.guest_nodes(H100_NODES, H100_MAJORS) == [
        "/dev/nvidia0",
        "/dev/nvidia1",
        "/dev/nvidiactl",
        "/dev/nvidia-caps/nvidia-cap1",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
    ]


def test_stale_node_major_is_named():
    with pytest.raises(
        HostStateError, match="/dev/nvidia-uvm has major 237 but /proc/devices gives its device major 238"
    ):
        proxmox.guest_nodes({**H100_NODES, "/dev/nvidia-uvm": (237, 0)}, H100_MAJORS, "pve1")


def test_lxc_lines_take_majors_from_proc_devices():
    nodes = proxmox.guest_nodes(H100_NODES, H100_MAJORS)
    assert proxmox.lxc_lines(H100_MAJORS, nodes) == [
        "lxc.cgroup2.devices.allow: c 195:* rwm",
        "lxc.cgroup2.devices.allow: c 238:* rwm",
        "lxc.cgroup2.devices.allow: c 241:* rwm",
        "lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file",
        "lxc.mount.entry: /dev/nvidia1 dev/nvidia1 none bind,optional,create=file",
        "lxc.mount.entry: /dev/nvidiactl dev/nvidiactl none bind,optional,create=file",
        "lxc.mount.entry: /dev/nvidia-caps/nvidia-cap1 dev/nvidia-caps/nvidia-cap1 none bind,optional,create=file",
        "lxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file",
        "lxc.mount.entry: /dev/nvidia-uvm-tools dev/nvidia-uvm-tools none bind,optional,create=file",
    ]


def test_dev_entries_keep_other_devices_and_fill_free_slots():
    options = PctConfig().process(lines("pct-config-101.txt"))["options"]
    to_set, delete = proxmox.dev_changes(options, ["/dev/nvidia0", "/dev/nvidia-uvm"])
    assert to_set == [("dev2", "/dev/nvidia-uvm")]  # dev2 held /dev/nvidiactl, no longer wanted: reused
    assert delete == []
    to_set, delete = proxmox.dev_changes(options, [])
    assert (to_set, delete) == ([], ["dev1", "dev2"])  # /dev/dri/renderD128 (dev0) is not ours


def test_features_add_nesting_and_keyctl_keep_the_rest():
    assert proxmox.features_value("fuse=1", unprivileged=True) == "fuse=1,nesting=1,keyctl=1"
    assert proxmox.features_value(None, unprivileged=False) == "nesting=1"
    assert proxmox.features_value("keyctl=1,nesting=1", unprivileged=True) is None


def test_guest_devices_dev_syntax_yields_pct_set(run_op):
    facts = {"PctConfig:101": PctConfig().process(lines("pct-config-101.txt")), "FileContents": None}
    nodes = ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    commands, _ = run_op(
        proxmox.guest_devices,
        facts,
        vmid=101,
        nodes=nodes,
        syntax="dev",
        majors=H100_MAJORS,
        record="/var/lib/gpufleet/proxmox/101.lxc-lines",
    )
    assert commands == ["pct set 101 --dev3 /dev/nvidia-uvm"]


def test_guest_devices_lxc_syntax_edits_the_file_and_records_its_lines(run_op, tmp_path):
    original = (DATA / "proxmox" / "101.conf").read_text()
    # an older driver gave nvidia-uvm major 508 and gpufleet passed /dev/nvidia9 as dev1 then
    text = original.replace(
        "lxc.cgroup2.devices.allow: c 195:* rwm\n",
        "lxc.cgroup2.devices.allow: c 195:* rwm\nlxc.cgroup2.devices.allow: c 508:* rwm\n",
        1,
    )
    text = text.replace(
        "dev0: /dev/dri/renderD128,gid=104\n", "dev0: /dev/dri/renderD128,gid=104\ndev1: /dev/nvidia9\n", 1
    )
    conf = tmp_path / "101.conf"
    conf.write_text(text)
    record = tmp_path / "101.lxc-lines"
    nodes = ["/dev/nvidia0", "/dev/nvidia-uvm"]
    facts = {
        "PctConfig:101": parse_pct_config(text.splitlines()),
        "FileContents": ["lxc.cgroup2.devices.allow: c 508:* rwm"],
    }
    commands, _ = run_op(
        proxmox.guest_devices, facts, vmid=101, nodes=nodes, syntax="lxc", majors=H100_MAJORS, record=str(record)
    )
    assert commands[0] == "pct set 101 --delete dev1"
    assert commands[1].startswith("awk ") and "/etc/pve/lxc/101.conf" in commands[1]
    subprocess.run(commands[1].replace("/etc/pve/lxc/101.conf", str(conf)), shell=True, check=True)
    subprocess.run("; ".join(commands[2:]), shell=True, check=True)
    main, snapshot = conf.read_text().split("\n[before-upgrade]\n")
    assert snapshot == original.split("\n[before-upgrade]\n")[1]  # snapshots untouched
    assert main.splitlines()[-5:] == [
        "unprivileged: 1",
        "lxc.cgroup2.devices.allow: c 195:* rwm",  # the stale 508 line is gone, the rest kept in place
        "lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file",
        "lxc.cgroup2.devices.allow: c 238:* rwm",
        "lxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file",
    ]
    assert record.read_text().splitlines() == proxmox.lxc_lines(H100_MAJORS, nodes)


def test_guest_devices_converged_is_a_noop(run_op):
    nodes = ["/dev/nvidia0", "/dev/nvidia-uvm"]
    wanted = proxmox.lxc_lines(H100_MAJORS, nodes)
    conf = {"options": {"unprivileged": "1"}, "lxc": [tuple(line.split(": ", 1)) for line in wanted]}
    commands, noops = run_op(
        proxmox.guest_devices,
        {"PctConfig:101": conf, "FileContents": wanted},
        vmid=101,
        nodes=nodes,
        syntax="lxc",
        majors=H100_MAJORS,
        record="/r",
    )
    assert commands == [] and noops


def test_guest_user_space_packages_have_no_kernel_module():
    assert driver_plan.userspace("Debian", "535", "535.261.03").packages == ["nvidia-smi", "libcuda1"]
    assert driver_plan.userspace("Ubuntu", "550", "550.127.05").packages == [
        "nvidia-utils-550-server",
        "libnvidia-compute-550-server",
    ]
    with pytest.raises(driver_plan.PlanError) as refused:
        driver_plan.plan("cuda-repo", "Ubuntu", "550.127.05", "k", None, {}, {}, kernel_module=False)
    assert refused.value.field == "nvidia_driver_source"


def test_no_cgroups_fact_and_operation(run_op):
    toml = (REPO / "tests/fixtures/nvidia_toolkit_double/config.toml").read_text().splitlines()
    assert nvidia_toolkit.NoCgroups().process(toml) is False
    commands, _ = run_op(nvidia_toolkit.cgroups_off, {"NoCgroups": False})
    assert commands == ["nvidia-ctk config --in-place --set nvidia-container-cli.no-cgroups"]
    set_on = [line.replace("#no-cgroups = false", "no-cgroups = true") for line in toml]
    assert nvidia_toolkit.NoCgroups().process(set_on) is True
    commands, noops = run_op(nvidia_toolkit.cgroups_off, {"NoCgroups": True})
    assert commands == [] and noops


def test_config_names_bad_proxmox_fields():
    from operations.core import checks

    with pytest.raises(ConfigError, match="proxmox_vmid"):
        checks.validate({"proxmox_vmid": 42})
    with pytest.raises(ConfigError, match="proxmox_passthrough"):
        checks.validate({"proxmox_passthrough": "cgroup"})
    with pytest.raises(ConfigError, match="did you mean 'proxmox_vmid'"):
        checks.validate({"proxmox_vimd": 101})


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_device_node_script_reads_majors_and_replaces_stale_nodes(tmp_path):
    dev, pci = tmp_path / "dev", tmp_path / "pci"
    dev.mkdir()
    for slot, klass in (("0000:01:00.0", "0x030200"), ("0000:02:00.0", "0x030000"), ("0000:01:00.1", "0x040300")):
        (pci / slot).mkdir(parents=True)
        (pci / slot / "vendor").write_text("0x10de\n")
        (pci / slot / "class").write_text(klass + "\n")
    devices = tmp_path / "devices"
    devices.write_text("\n".join(H100_DEVICES) + "\n")
    os.mknod(dev / "nvidia-uvm", stat.S_IFCHR | 0o666, os.makedev(237, 0))  # left by an older driver
    env = {**os.environ, "PROC_DEVICES": str(devices), "DEV": str(dev), "PCI": str(pci), "GPUFLEET_NO_MODPROBE": "1"}
    script = str(REPO / "templates" / "gpufleet-nvidia-device-nodes")
    first = subprocess.run(["sh", script], env=env, capture_output=True, text=True, check=True)
    numbers = {p.name: (os.major(p.stat().st_rdev), os.minor(p.stat().st_rdev)) for p in dev.iterdir()}
    assert numbers == {
        "nvidia0": (195, 0),
        "nvidia1": (195, 1),
        "nvidiactl": (195, 255),
        "nvidia-uvm": (238, 0),
        "nvidia-uvm-tools": (238, 1),
    }
    assert "created " + str(dev / "nvidia-uvm") + " (c 238:0)" in first.stdout
    second = subprocess.run(["sh", script], env=env, capture_output=True, text=True, check=True)
    assert "created" not in second.stdout and "2 GPU(s), major 195, nvidia-uvm 238" in second.stdout
    devices.write_text("Character devices:\n  1 mem\n")
    failed = subprocess.run(["sh", script], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "is the NVIDIA kernel module loaded?" in failed.stderr


def _pct(root, *args):
    """The lab's pct double run against a configuration tree under ``root``."""
    return subprocess.run(
        [sys.executable, str(DOUBLE_DIR / "pct"), *args],
        env={**os.environ, "GPUFLEET_PCT_DOUBLE_ROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _section(text, name):
    """The ``key: value`` lines of one section of a .conf (None: the main one)."""
    found, current = [], None
    for line in text.splitlines():
        if line.startswith("["):
            current = line
            continue
        if current == name and ":" in line and not line.startswith("#"):
            found.append(line)
    return found


def test_the_pct_double_stages_changes_and_hotplugs_as_pve_container_does(tmp_path):
    """As pve-container's update_pct_config and vmconfig_hotplug_pending do on a running guest: a new
    devN is hot-plugged, a changed one and features wait in [pve:pending] (pct config shows them
    taken in, --current does not), a deletion of a devN waits too; a reboot applies them (vm_start);
    on a stopped guest everything applies at once; a path that is not a device node is refused."""
    conf = tmp_path / "etc/pve/lxc/101.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text((DOUBLE_DIR / "101.conf").read_text())
    null = "/dev/null"  # a character device everywhere
    assert _pct(tmp_path, "set", "101", "--dev0", null, "--features", "fuse=1,nesting=1").returncode == 0
    text = conf.read_text()
    assert "dev0: /dev/null" in _section(text, None)  # new device: hot-plugged
    assert _section(text, "[pve:pending]") == ["features: fuse=1,nesting=1"]
    assert "features: fuse=1,nesting=1" in _pct(tmp_path, "config", "101").stdout.splitlines()
    assert "features: fuse=1" in _pct(tmp_path, "config", "101", "--current").stdout.splitlines()
    assert _pct(tmp_path, "set", "101", "--dev0", "/dev/zero").returncode == 0  # an existing devN changed
    assert _section(conf.read_text(), "[pve:pending]") == ["dev0: /dev/zero", "features: fuse=1,nesting=1"]
    assert _pct(tmp_path, "set", "101", "--delete", "dev0").returncode == 0
    assert _section(conf.read_text(), "[pve:pending]") == ["delete: dev0", "features: fuse=1,nesting=1"]
    assert "dev0: /dev/null" in _section(conf.read_text(), None)
    assert not [line for line in _pct(tmp_path, "config", "101").stdout.splitlines() if line.startswith("dev0")]
    assert _pct(tmp_path, "reboot", "101").returncode == 0
    text = conf.read_text()
    assert "[pve:pending]" not in text and "features: fuse=1,nesting=1" in _section(text, None)
    assert not [line for line in _section(text, None) if line.startswith("dev0")]
    assert "snaptime: 1731500000" in _section(text, "[before-gpu]")  # snapshots kept
    (tmp_path / "var/lib/gpufleet-pct-double").mkdir(parents=True)
    (tmp_path / "var/lib/gpufleet-pct-double/101.stopped").touch()
    assert _pct(tmp_path, "status", "101").stdout == "status: stopped\n"
    assert _pct(tmp_path, "set", "101", "--dev1", null, "--features", "fuse=1").returncode == 0
    assert "[pve:pending]" not in conf.read_text()  # stopped: applied at once
    refused = _pct(tmp_path, "set", "101", "--dev2", str(conf))
    assert refused.returncode == 255 and f"{conf} is not a device" in refused.stderr
    refused = _pct(tmp_path, "set", "101", "--dev2", "/dev/nvidia-none")
    assert refused.returncode == 255 and "Device /dev/nvidia-none does not exist" in refused.stderr
