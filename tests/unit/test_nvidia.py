"""Driver and toolkit: packages per source and distro, commands yielded for given facts."""

import hashlib

import pytest

from operations import apt_pin, nvidia_driver, nvidia_toolkit
from operations.json_facts import JsonFile

DEBIAN_535 = ["nvidia-kernel-dkms", "nvidia-smi", "libcuda1"]


def test_debian_packages():
    assert nvidia_driver.driver_packages("distro", "Debian", "535.261.03") == DEBIAN_535


def test_ubuntu_prefers_signed_precompiled_modules():
    packages = nvidia_driver.driver_packages("distro", "Ubuntu", "535.183.01", "6.8.0-45-generic", precompiled=True)
    assert packages == ["nvidia-headless-535-server", "nvidia-utils-535-server",
                        "linux-modules-nvidia-535-server-6.8.0-45-generic"]
    assert not nvidia_driver.uses_dkms(packages)


def test_ubuntu_falls_back_to_dkms():
    packages = nvidia_driver.driver_packages("distro", "Ubuntu", "535.183.01", "6.8.0-45-generic")
    assert "nvidia-dkms-535-server" in packages and nvidia_driver.uses_dkms(packages)


def test_cuda_repo_and_fabric_manager_on_nvswitch_systems():
    assert nvidia_driver.driver_packages("cuda-repo", "Ubuntu", "550.127.08", nvswitch=True) == [
        "cuda-drivers-550", "nvidia-fabricmanager-550"]


def test_debian_nonfree_sources():
    assert nvidia_driver.debian_nonfree_lines("http://m/debian", "http://m/debian-security", "bookworm") == [
        "deb http://m/debian bookworm contrib non-free non-free-firmware",
        "deb http://m/debian bookworm-updates contrib non-free non-free-firmware",
        "deb http://m/debian-security bookworm-security contrib non-free non-free-firmware"]


def test_pin_file_prefers_the_version_over_upgrades():
    assert apt_pin.pin_file(["*nvidia*", "libcuda*"], "535.261.03") == (
        "Package: *nvidia* libcuda*\nPin: version 535.261.03-*\nPin-Priority: 1001\n")


def test_fresh_host_gets_install_and_hold(run_op):
    commands, _ = run_op(apt_pin.installed, {"DebPackages": {}, "AptHeldPackages": set()},
                         packages=DEBIAN_535, version="535.261.03", pin_name="p")
    assert commands[-2] == apt_pin.APT_INSTALL + " nvidia-kernel-dkms nvidia-smi libcuda1"
    assert commands[-1] == "apt-mark hold libcuda1 nvidia-kernel-dkms nvidia-smi"


def test_silently_upgraded_driver_is_moved_back(run_op):
    facts = {"DebPackages": {"nvidia-kernel-dkms": ["535.309.01-0+deb12u1"], "nvidia-smi": ["535.261.03-1"],
                             "libcuda1": ["535.261.03-1"]},
             "AptHeldPackages": set(DEBIAN_535)}
    commands, _ = run_op(apt_pin.installed, facts, packages=DEBIAN_535, version="535.261.03", pin_name="p")
    assert apt_pin.APT_INSTALL + " nvidia-kernel-dkms nvidia-smi libcuda1" in commands
    assert not any(c.startswith("apt-mark") for c in commands if isinstance(c, str))


def test_converged_driver_is_a_noop(run_op):
    content = apt_pin.pin_file(DEBIAN_535, "535.261.03")
    facts = {"DebPackages": {name: ["535.261.03-1"] for name in DEBIAN_535}, "AptHeldPackages": set(DEBIAN_535),
             "File": {"mode": 644, "user": "root", "group": "root"}, "Directory": {"mode": 755},
             "Sha1File": hashlib.sha1(content.encode()).hexdigest()}
    commands, noops = run_op(apt_pin.installed, facts, packages=DEBIAN_535, version="535.261.03", pin_name="p")
    assert commands == []
    assert noops[-1] == "nvidia-kernel-dkms, nvidia-smi, libcuda1 at 535.261.03 and held"


@pytest.mark.parametrize("path", ["nvidia-container-runtime", "/usr/bin/nvidia-container-runtime"])
def test_runtime_already_configured_by_name_or_path(run_op, path):
    daemon = {"runtimes": {"nvidia": {"args": [], "path": path}}}
    commands, noops = run_op(nvidia_toolkit.docker_runtime, {"JsonFile": daemon})
    assert commands == [] and noops


def test_runtime_missing_runs_nvidia_ctk(run_op):
    commands, _ = run_op(nvidia_toolkit.docker_runtime, {"JsonFile": {"log-driver": "json-file"}})
    assert commands == ["nvidia-ctk runtime configure --runtime=docker"]


def test_runtime_set_as_default(run_op):
    daemon = {"runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}
    commands, _ = run_op(nvidia_toolkit.docker_runtime, {"JsonFile": daemon}, set_as_default=True)
    assert commands == ["nvidia-ctk runtime configure --runtime=docker --set-as-default"]


def test_runtime_refuses_malformed_daemon_json(run_op):
    with pytest.raises(Exception, match="daemon.json: not valid JSON"):
        run_op(nvidia_toolkit.docker_runtime, {"JsonFile": JsonFile().process(['{"a": '])})
