"""GPU hosts: driver and toolkit packages at the pinned versions and held, nouveau blacklisted,
the nvidia runtime in daemon.json (earlier keys kept) and listed by Docker; the GPU itself where
there is one."""

import json
import re

import pytest

from tests.checks.meant import only_where

PIN = "/etc/apt/preferences.d/gpufleet-nvidia-driver"
# The package each distro's driver version is read from: Debian's nvidia-smi, Ubuntu's nvidia-utils-<branch>-server.
UTILS = re.compile(r"^(nvidia-smi|nvidia-utils-\d+-server)$")
TOOLKIT_PACKAGES = [
    "libnvidia-container1",
    "libnvidia-container-tools",
    "nvidia-container-toolkit-base",
    "nvidia-container-toolkit",
]


@pytest.fixture
def driver_host(host, intent):
    return only_where(host, "nvidia_driver_version" in intent, f"no NVIDIA driver here (groups {intent['groups']})")


@pytest.fixture
def gpu_host(driver_host, intent):
    return only_where(driver_host, "engine" in intent, "no container engine here (a Proxmox host)")


@pytest.fixture
def containerd_host(gpu_host, intent):
    return only_where(gpu_host, intent["engine"] == "containerd", f"its engine is {intent['engine']}, not containerd")


@pytest.fixture
def kernel_host(driver_host, intent):
    return only_where(driver_host, "lxc" not in intent, "an LXC guest: its Proxmox host owns the kernel module")


def held(host):
    return set(host.check_output("apt-mark showhold").split())


def pinned_version(host):
    match = re.search(r"^Pin: version (\S+)-\*$", host.file(PIN).content_string, re.M)
    assert match, f"{PIN} pins no version"
    return match.group(1)


def test_nvidia_packages_kept_out_of_unattended_upgrades(driver_host):
    """unattended-upgrades reads Unattended-Upgrade::Package-Blacklist (regular expressions matched at
    the start of each package name) through apt's configuration: apt's own parser must list NVIDIA's
    packages there."""
    dumped = driver_host.run("apt-config dump").stdout
    listed = set(re.findall(r'^Unattended-Upgrade::Package-Blacklist:: "([^"]+)";$', dumped, re.M))
    assert {"nvidia-", "libnvidia-", "libcuda", "cuda-drivers"} <= listed, listed
    for package in ("nvidia-smi", "libnvidia-ml1", "libcuda1", "nvidia-kernel-dkms"):
        assert any(re.match(pattern, package) for pattern in listed), package


def test_driver_pin_is_the_configured_version_or_of_its_branch(driver_host, intent):
    pinned, wanted = pinned_version(driver_host), intent["nvidia_driver_version"]
    assert pinned == wanted or (re.fullmatch(r"\d{3}", wanted) and pinned.startswith(wanted + ".")), (pinned, wanted)


def test_driver_packages_at_the_pinned_version_and_held(driver_host):
    pinned = pinned_version(driver_host)
    listing = driver_host.check_output(
        "dpkg-query -W -f '${db:Status-Abbrev}${Package} ${Version}\\n' '*nvidia*' 'libcuda*'"
    ).splitlines()
    # ${db:Status-Abbrev} is three characters: wanted state ("i" install, "h" hold), then "i" when installed.
    installed = dict(line[3:].split(" ", 1) for line in listing if line[1:2] == "i")
    utils = [name for name in installed if UTILS.match(name)]
    assert utils, f"no nvidia-smi or nvidia-utils-*-server installed: {sorted(installed)}"
    assert all(installed[name].split(":")[-1].startswith(pinned + "-") for name in utils), (utils, pinned)
    held_here = held(driver_host)
    assert set(utils) <= held_here
    # What is held is at the pinned version; module packages (kernel's version) are never held.
    for name in held_here & set(installed):
        if "nvidia-container" not in name:
            assert installed[name].split(":")[-1].startswith(pinned + "-"), (name, installed[name])
    assert not any(name.startswith(("linux-modules-nvidia-", "linux-objects-nvidia-")) for name in held_here)


def test_the_running_kernel_has_the_nvidia_module_of_the_pinned_version(kernel_host, intent):
    kernel = kernel_host.check_output("uname -r")
    # Ubuntu's and NVIDIA's packages name the module nvidia; Debian's DKMS package nvidia-current.
    found = kernel_host.run(
        f"for m in nvidia nvidia-current nvidia-current-open; do "
        f"modinfo -k {kernel} -F version $m 2>/dev/null && exit 0; done; exit 1"
    )
    if found.rc != 0 and not intent["gpus"] and not kernel_host.file(f"/lib/modules/{kernel}/build").exists:
        # Only where apt offers no headers package either: one it offers should have been installed.
        offered = kernel_host.run(f"apt-cache policy linux-headers-{kernel} | grep -q 'Candidate: [^(]'")
        assert offered.rc != 0, f"apt offers linux-headers-{kernel}, but neither they nor the NVIDIA module are here"
        pytest.skip(f"no headers for {kernel} and no GPU: the deploy said so and left the module unbuilt")
    assert found.rc == 0, f"no NVIDIA module for the running kernel {kernel}"
    assert found.stdout.strip() == pinned_version(kernel_host)


def test_toolkit_packages_pinned_and_held(gpu_host, intent):
    for name in TOOLKIT_PACKAGES:
        assert gpu_host.package(name).version == intent["nvidia_toolkit_version"] + "-1", name
    assert set(TOOLKIT_PACKAGES) <= held(gpu_host)


def test_nouveau_blacklisted(kernel_host):
    content = kernel_host.file("/etc/modprobe.d/gpufleet-blacklist-nouveau.conf").content_string
    assert "blacklist nouveau" in content and "options nouveau modeset=0" in content


def test_daemon_json_has_nvidia_runtime_and_log_rotation(docker_host):
    daemon = json.loads(docker_host.file("/etc/docker/daemon.json").content_string)
    assert daemon["runtimes"]["nvidia"]["path"].endswith("nvidia-container-runtime")
    assert daemon["log-driver"] == "json-file"


def test_docker_lists_the_nvidia_runtime(docker_host):
    runtimes = json.loads(docker_host.check_output("docker info --format '{{json .Runtimes}}'"))
    assert "nvidia" in runtimes


def test_nvidia_smi_reports_the_pinned_driver(gpu_host, intent):
    if not intent["gpus"]:
        pytest.skip("no NVIDIA GPU on this host: nvidia-smi cannot reach a driver")
    version = gpu_host.check_output("nvidia-smi --query-gpu=driver_version --format=csv,noheader").splitlines()[0]
    assert version == pinned_version(gpu_host)


def test_containerd_has_the_nvidia_runtime(containerd_host):
    dump = containerd_host.check_output("containerd config dump")
    assert "runtimes.nvidia]" in dump and "nvidia-container-runtime" in dump
    assert containerd_host.service("containerd").is_running


def test_gpus_reach_a_container(docker_host, intent):
    if not intent["gpus"]:
        pytest.skip("no NVIDIA GPU on this host: no container can be given one")
    listed = docker_host.check_output(
        f"docker run --rm --gpus all {intent['nvidia_toolkit_check_image']} nvidia-smi -L"
    )
    assert len([line for line in listed.splitlines() if line.startswith("GPU ")]) == intent["gpus"], listed


def test_gpu_nodes_are_linked_in_dev_char(gpu_host, intent):
    if not intent["gpus"] or "lxc" in intent:
        pytest.skip("no NVIDIA GPU on this host" if not intent["gpus"] else "an LXC guest: its host links the nodes")
    nodes = gpu_host.check_output("stat -c '%n %t %T' /dev/nvidia[0-9]* /dev/nvidiactl /dev/nvidia-uvm").splitlines()
    for node, major, minor in (line.split() for line in nodes):
        link = f"/dev/char/{int(major, 16)}:{int(minor, 16)}"
        assert gpu_host.file(link).linked_to == node, link
