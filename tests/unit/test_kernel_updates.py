"""Hosts that survive their own kernel updates: the headers meta packages of the installed kernels'
flavours come with a DKMS plan (real apt output: tests/data/debian), and the module is checked for the
kernel the host boots next as well as the running one, before any reboot."""

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyinfra.api import OperationError
from pyinfra.context import ctx_host

from operations import TEMPLATES
from operations.core import apt_pin
from operations.driver import install as nvidia_driver
from operations.driver import plan as driver_plan
from operations.driver.devices import InstalledKernels, next_boot
from operations.driver.facts import AptPackages
from tests.fixtures.ubuntu_double import apt_view

DATA = Path(__file__).resolve().parents[1] / "data" / "debian"
DEBIAN_APT = AptPackages().process((DATA / "apt-packages-lab-1.txt").read_text().splitlines())
HEADER_METAS = AptPackages().process((DATA / "apt-packages-header-metas.txt").read_text().splitlines())
RUNNING, NEXT = "6.1.0-56-amd64", "6.1.0-57-amd64"


def test_the_headers_meta_of_each_installed_kernels_flavour_comes_with_a_debian_dkms_plan():
    apt = {**DEBIAN_APT, **HEADER_METAS}
    plan = driver_plan.plan("distro", "Debian", "535.261.03", RUNNING, None, apt, {}, kernels=["6.1.0-57-cloud-amd64"])
    assert plan.header_metas == ["linux-headers-amd64", "linux-headers-cloud-amd64"]  # no rt kernel: no rt meta
    assert plan.notes[-1] == "the next kernels' headers come with linux-headers-amd64, linux-headers-cloud-amd64"


def test_the_apt_fact_takes_the_candidates_record_of_a_meta_with_several_versions():
    # apt-cache show lists 6.1.176-1 (ABI 6.1.0-50) and 6.1.192-3 (ABI 6.1.0-57); the candidate is 6.1.192-3
    meta = HEADER_METAS["linux-headers-amd64"]
    assert meta["candidate"] == "6.1.192-3"
    assert meta["depends"] == "linux-headers-6.1.0-57-amd64 (= 6.1.192-3)"


def test_a_headers_meta_apt_does_not_offer_is_left_out_and_asked_about_once():
    assert driver_plan.plan("distro", "Debian", "535.261.03", RUNNING, None, DEBIAN_APT, {}).header_metas == []
    asked = driver_plan.relevant_packages("distro", "Debian", "535", RUNNING, None, kernels=["6.1.0-57-rt-amd64"])
    assert asked[-2:] == ["linux-headers-amd64", "linux-headers-rt-amd64"]


def test_proxmox_takes_its_default_headers_and_ubuntu_none():
    assert driver_plan.header_meta_names("Debian", ["6.8.12-4-pve"], proxmox=8) == ["proxmox-default-headers"]
    assert driver_plan.header_meta_names("Debian", ["5.15.158-2-pve"], proxmox=7) == ["pve-headers"]
    assert driver_plan.header_meta_names("Ubuntu", ["6.8.0-136-generic"]) == []
    assert driver_plan.header_meta_names("Debian", ["6.18.44-fc-v782"]) == []  # not a distribution kernel


def test_installed_kernels_and_the_one_booted_next():
    kernels = InstalledKernels().process(
        [f"{RUNNING} image headers", f"{NEXT} image none", "6.10.1-1-amd64 none headers"]
    )
    assert kernels[NEXT] == {"image": True, "headers": False}
    assert next_boot(kernels, RUNNING) == NEXT  # the newest image, not a headers-only tree
    assert next_boot({}, RUNNING) == RUNNING  # no image (a container): what runs


def dkms_plan(**apt):
    return driver_plan.DriverPlan(
        version="535.261.03",
        packages=["nvidia-kernel-dkms", "nvidia-smi", "libcuda1"],
        headers=f"linux-headers-{RUNNING}",
        dkms=True,
        header_metas=["linux-headers-amd64"],
        apt=apt,
    )


def candidate(installed=None):
    return {"installed": installed, "candidate": "6.1.192-3", "versions": ["6.1.192-3"]}


@pytest.fixture
def planned(monkeypatch):
    def use(plan):
        monkeypatch.setattr(nvidia_driver, "_plan_in_operation", lambda *args, **kwargs: plan)

    return use


def test_the_running_kernels_headers_and_the_meta_are_installed_in_one_step(run_op, planned):
    planned(dkms_plan(**{f"linux-headers-{RUNNING}": candidate(), "linux-headers-amd64": candidate()}))
    commands, _ = run_op(
        nvidia_driver.kernel_headers,
        {"KernelHeaders": {"kernel": RUNNING, "headers": False}},
        source="distro",
        requested="535.261.03",
    )
    assert commands == [f"{apt_pin.APT_INSTALL} linux-headers-{RUNNING} linux-headers-amd64"]


def test_headers_and_meta_in_place_change_nothing(run_op, planned):
    installed = candidate(installed="6.1.192-3")
    planned(dkms_plan(**{f"linux-headers-{RUNNING}": installed, "linux-headers-amd64": installed}))
    commands, noops = run_op(
        nvidia_driver.kernel_headers,
        {"KernelHeaders": {"kernel": RUNNING, "headers": True}},
        source="distro",
        requested="535.261.03",
    )
    assert commands == [] and noops[-1] == "the next kernels' headers come with linux-headers-amd64 (installed)"


def kernels_facts(next_headers=True, next_module=None):
    return {
        "KernelHeaders": {"kernel": RUNNING, "headers": True},
        "InstalledKernels": {
            RUNNING: {"image": True, "headers": True},
            NEXT: {"image": True, "headers": next_headers},
        },
        f"NvidiaModuleFor:{RUNNING}": {"module": "nvidia-current", "version": "535.261.03", "filename": "/x.ko"},
        f"NvidiaModuleFor:{NEXT}": next_module,
    }


def test_the_kernel_booted_next_gets_its_module_built_before_any_reboot(run_op, planned):
    planned(dkms_plan())
    commands, noops = run_op(nvidia_driver.module_built, kernels_facts(), source="distro", requested="535.261.03")
    assert len(commands) == 1 and f"gpufleet-module-check {NEXT} 535.261.03 " in commands[0]
    assert noops == [f"nvidia-current 535.261.03 for the running kernel {RUNNING} (/x.ko)"]
    built = {"module": "nvidia-current", "version": "535.261.03", "filename": "/y.ko"}
    assert (
        run_op(nvidia_driver.module_built, kernels_facts(next_module=built), source="distro", requested="535.261.03")[0]
        == []
    )


def test_a_gpu_host_whose_next_kernel_has_no_headers_is_refused_naming_the_kernel(run_op, planned):
    planned(dkms_plan())
    with pytest.raises(
        OperationError,
        match=rf"the kernel this host boots next, {NEXT}, has no NVIDIA module "
        r"535.261.03 and no headers.*linux-headers-amd64",
    ):
        run_op(
            nvidia_driver.module_built,
            kernels_facts(next_headers=False),
            source="distro",
            requested="535.261.03",
            gpus=1,
        )
    commands, noops = run_op(
        nvidia_driver.module_built, kernels_facts(next_headers=False), source="distro", requested="535.261.03", gpus=0
    )
    assert (
        commands == []
        and noops[-1] == f"no headers for the kernel this host boots next {NEXT}: the module is not built here"
    )


def run_module_check(tmp_path, modinfo_version, *which):
    """templates/gpufleet-module-check with stand-ins for dkms and modinfo on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "dkms").write_text('#!/bin/sh\necho "dkms $*" >> "$LOG"\n')
    (bin_dir / "modinfo").write_text(f"#!/bin/sh\n[ -n '{modinfo_version}' ] && echo '{modinfo_version}'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path / "calls")}
    return subprocess.run(
        [
            "sh",
            "-c",
            (TEMPLATES / "gpufleet-module-check").read_text(),
            "gpufleet-module-check",
            NEXT,
            "535.261.03",
            str(tmp_path / "nowhere" / "make.log"),
            *which,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_module_check_builds_for_the_kernel_it_names_and_fails_naming_the_log(tmp_path):
    ok = run_module_check(tmp_path, "535.261.03")
    assert ok.returncode == 0 and f"dkms autoinstall -k {NEXT}" in (tmp_path / "calls").read_text()
    missing = run_module_check(tmp_path, "")
    assert missing.returncode == 1
    assert f"NVIDIA module 535.261.03 is not built for the running kernel {NEXT} (found: none)" in missing.stderr
    assert "DKMS build log: none under /var/lib/dkms" in missing.stderr
    upcoming = run_module_check(tmp_path, "535.154.05", "the kernel this host boots next")
    assert f"not built for the kernel this host boots next {NEXT} (found: 535.154.05)" in upcoming.stderr


DEBIAN_309 = {
    "nvidia-smi": {
        "installed": "535.261.03-1",
        "candidate": "535.261.03-1",
        "versions": ["535.309.01-0+deb12u1", "535.261.03-1"],
    }
}


def test_a_branch_keeps_its_point_release_in_deploy_and_rolls_to_the_newest_in_upgrade(monkeypatch):
    # deploy.py: the branch keeps what the host has (tests/data/debian: 535.309.01 offered beside it)
    assert driver_plan.resolve_version("535", "nvidia-smi", DEBIAN_APT) == "535.261.03"
    assert driver_plan.newest_of_branch("535", "nvidia-smi", DEBIAN_APT) == "535.309.01"
    assert driver_plan.newest_of_branch("580", "nvidia-smi", DEBIAN_APT) is None
    # upgrade.py: the branch's newest point release is what a rollout moves the host to
    kept = driver_plan.DriverPlan(version="535.261.03", packages=["nvidia-smi"], apt=DEBIAN_309)
    monkeypatch.setattr(nvidia_driver, "installed_version", lambda *args: "535.261.03")
    monkeypatch.setattr(nvidia_driver, "host_plan", lambda *args: kept)
    monkeypatch.setattr(nvidia_driver.host_memo, "fact", lambda fact, **kw: {"name": "Debian"})
    fake = SimpleNamespace(data=SimpleNamespace(nvidia_driver_source="distro", nvidia_driver_open=False))
    with ctx_host.use(fake):
        assert nvidia_driver.upgrade_from(requested="535") == ("535.261.03", "535.309.01")
        assert nvidia_driver.upgrade_from(requested="535.261.03") is None  # an exact pin the host has
        newest = driver_plan.DriverPlan(version="535.309.01", packages=["nvidia-smi"], apt=DEBIAN_309)
        monkeypatch.setattr(nvidia_driver, "installed_version", lambda *args: "535.309.01")
        monkeypatch.setattr(nvidia_driver, "host_plan", lambda *args: newest)
        assert nvidia_driver.upgrade_from(requested="535") is None  # on the newest: nothing to roll


UBUNTU = apt_view()  # Ubuntu noble's real records (tests/data/ubuntu)
GA, HWE, UNPUBLISHED = "6.8.0-136-generic", "6.17.0-35-generic", "6.8.0-137-generic"


def test_ubuntu_names_an_installed_kernel_canonical_published_no_module_for():
    plan = driver_plan.plan("distro", "Ubuntu", "580.173.02", GA, "generic", UBUNTU, {}, kernels=[GA, UNPUBLISHED])
    assert not plan.dkms  # the running kernel keeps its precompiled module
    assert plan.unmodulated == {
        UNPUBLISHED: f"no precompiled module for {UNPUBLISHED} "
        f"(linux-modules-nvidia-580-server-{UNPUBLISHED} is not in the host's apt sources)"
    }
    assert (
        driver_plan.plan("distro", "Ubuntu", "580.173.02", GA, "generic", UBUNTU, {}, kernels=[GA, HWE]).unmodulated
        == {}
    )


def test_ubuntu_names_a_kernel_whose_module_needs_a_newer_point_release():
    # the real records' modules need nvidia-kernel-common-580-server >= 580.173.02: pinned older, each is a gap
    assert driver_plan.precompiled_gap("580-server", "580.159.03", HWE, UBUNTU) == (
        f"linux-modules-nvidia-580-server-{HWE} needs driver >= 580.173.02, and the pin holds 580.159.03"
    )
    assert driver_plan.precompiled_gap("580-server", "580.173.02", HWE, UBUNTU) is None


def ubuntu_facts():
    module = {"module": "nvidia", "version": "580.173.02", "filename": "/x.ko"}
    return {
        "KernelHeaders": {"kernel": GA, "headers": False},
        "InstalledKernels": {GA: {"image": True, "headers": False}, UNPUBLISHED: {"image": True, "headers": False}},
        f"NvidiaModuleFor:{GA}": module,
        f"NvidiaModuleFor:{UNPUBLISHED}": None,
    }


def test_the_kernel_booted_next_without_its_module_is_named_before_the_reboot(run_op, planned):
    plan = driver_plan.plan("distro", "Ubuntu", "580.173.02", GA, "generic", UBUNTU, {}, kernels=[GA, UNPUBLISHED])
    planned(plan)
    with pytest.raises(
        OperationError,
        match=rf"the kernel this host boots next, {UNPUBLISHED}, has no NVIDIA "
        r"module 580.173.02: no precompiled module .* Before rebooting, choose",
    ):
        run_op(nvidia_driver.module_built, ubuntu_facts(), source="distro", requested="580", gpus=1)
    commands, noops = run_op(nvidia_driver.module_built, ubuntu_facts(), source="distro", requested="580", gpus=0)
    assert commands == [] and noops[-1].startswith(f"the kernel this host boots next, {UNPUBLISHED}, has no")
