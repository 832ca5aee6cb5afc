"""GPU hosts: driver and toolkit packages at the pinned versions and held, nouveau blacklisted,
the nvidia runtime in daemon.json (earlier keys kept) and listed by Docker; the GPU itself where
there is one."""

import json

import pytest

DRIVER_PACKAGES = ["nvidia-smi", "libcuda1"]
TOOLKIT_PACKAGES = ["libnvidia-container1", "libnvidia-container-tools",
                    "nvidia-container-toolkit-base", "nvidia-container-toolkit"]


@pytest.fixture
def driver_host(host, intent):
    if "nvidia_driver_version" not in intent:
        pytest.skip(f"{host.backend.get_hostname()}: no NVIDIA driver here (groups {intent['groups']})")
    return host


@pytest.fixture
def gpu_host(driver_host, intent):
    if "engine" not in intent:
        pytest.skip(f"{driver_host.backend.get_hostname()}: no container engine here (a Proxmox host)")
    return driver_host


@pytest.fixture
def containerd_host(gpu_host, intent):
    if intent["engine"] != "containerd":
        pytest.skip(f"{gpu_host.backend.get_hostname()}: its engine is {intent['engine']}, not containerd")
    return gpu_host


@pytest.fixture
def kernel_host(driver_host, intent):
    if "lxc" in intent:
        pytest.skip(f"{driver_host.backend.get_hostname()}: an LXC guest: its Proxmox host owns the kernel module")
    return driver_host


def held(host):
    return set(host.check_output("apt-mark showhold").split())


def test_driver_packages_pinned_and_held(driver_host, intent):
    for name in DRIVER_PACKAGES:
        package = driver_host.package(name)
        assert package.is_installed, name
        assert package.version.startswith(intent["nvidia_driver_version"] + "-"), (name, package.version)
    assert set(DRIVER_PACKAGES) <= held(driver_host)


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
    assert version == intent["nvidia_driver_version"]


def test_containerd_has_the_nvidia_runtime(containerd_host):
    dump = containerd_host.check_output("containerd config dump")
    assert 'runtimes.nvidia]' in dump and 'nvidia-container-runtime' in dump
    assert containerd_host.service("containerd").is_running


def test_gpus_reach_a_container(docker_host, intent):
    if not intent["gpus"]:
        pytest.skip("no NVIDIA GPU on this host: no container can be given one")
    listed = docker_host.check_output(f"docker run --rm --gpus all {intent['nvidia_toolkit_check_image']} nvidia-smi -L")
    assert len([line for line in listed.splitlines() if line.startswith("GPU ")]) == intent["gpus"], listed


def test_gpu_nodes_are_linked_in_dev_char(gpu_host, intent):
    if not intent["gpus"] or "lxc" in intent:
        pytest.skip("no NVIDIA GPU on this host" if not intent["gpus"] else "an LXC guest: its host links the nodes")
    nodes = gpu_host.check_output("stat -c '%n %t %T' /dev/nvidia[0-9]* /dev/nvidiactl /dev/nvidia-uvm").splitlines()
    for node, major, minor in (line.split() for line in nodes):
        link = f"/dev/char/{int(major, 16)}:{int(minor, 16)}"
        assert gpu_host.file(link).linked_to == node, link
