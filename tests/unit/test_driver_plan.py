"""The driver plan from real package data: Debian's apt as a lab host reports it
(tests/data/debian), Ubuntu noble's archive records (tests/data/ubuntu), GPUs by pci.ids."""

from pathlib import Path

import pytest

from operations.core import apt_pin
from operations.driver import plan as driver_plan
from operations.driver.facts import AptPackages, KernelImages, image_meta
from tests.fixtures.ubuntu_double import apt_view

DATA = Path(__file__).resolve().parents[1] / "data"
DEBIAN_APT = AptPackages().process((DATA / "debian" / "apt-packages-lab-1.txt").read_text().splitlines())
UBUNTU = apt_view()
V = "580.173.02-0ubuntu0.24.04.1"


def test_debian_apt_fact_reads_installed_candidate_versions_and_record():
    assert DEBIAN_APT["nvidia-smi"] == {
        "installed": "535.261.03-1",
        "candidate": "535.261.03-1",
        "versions": ["535.309.01-0+deb12u1", "535.261.03-1"],
        "section": "non-free/utils",
        "depends": "nvidia-alternative (= 535.261.03-1), libnvidia-ml1 (= 535.261.03-1), libc6 (>= 2.34)",
    }
    assert "nosuchpkg" not in DEBIAN_APT


def test_apt_fact_reads_a_record_from_dpkgs_status_whose_section_comes_before_its_version():
    # a package installed from a local .deb: apt's only record of it is dpkg's status file
    local = AptPackages().process((DATA / "debian" / "apt-packages-local.txt").read_text().splitlines())
    assert local["google-cloud-cli-anthoscli"]["section"] == "misc"
    assert local["google-cloud-cli-anthoscli"]["depends"] == "google-cloud-cli (>> 470.0.0-0)"


def test_debian_dkms_driver_with_the_running_kernels_headers():
    plan = driver_plan.plan("distro", "Debian", "535.261.03", "6.1.0-56-amd64", None, DEBIAN_APT, {})
    assert (plan.version, plan.packages, plan.headers, plan.dkms, plan.modules) == (
        "535.261.03",
        ["nvidia-kernel-dkms", "nvidia-smi", "libcuda1"],
        "linux-headers-6.1.0-56-amd64",
        True,
        [],
    )


def test_proxmox_host_headers_are_its_own():
    assert driver_plan.debian("535.261.03", "6.8.12-4-pve", proxmox=8).headers == "proxmox-headers-6.8.12-4-pve"
    assert driver_plan.debian("535.261.03", "5.15.158-2-pve", proxmox=7).headers == "pve-headers-5.15.158-2-pve"


def test_branch_keeps_what_is_installed_and_takes_the_newest_on_a_fresh_host():
    assert driver_plan.resolve_version("535", "nvidia-smi", DEBIAN_APT) == "535.261.03"
    fresh = {"nvidia-smi": {**DEBIAN_APT["nvidia-smi"], "installed": None}}
    assert driver_plan.resolve_version("535", "nvidia-smi", fresh) == "535.309.01"


def test_exact_version_no_longer_offered_is_refused_naming_what_is():
    with pytest.raises(driver_plan.PlanError) as refused:
        driver_plan.resolve_version("535.183.01", "nvidia-smi", DEBIAN_APT)
    assert refused.value.field == "nvidia_driver_version"
    assert str(refused.value).startswith(
        "535.183.01 is not in the host's apt sources, and not installed: they offer "
        "nvidia-smi 535.309.01-0+deb12u1, 535.261.03-1."
    )


def test_unknown_branch_is_refused():
    with pytest.raises(
        driver_plan.PlanError, match="branch 580: the host's apt sources offer no nvidia-smi of that branch"
    ):
        driver_plan.resolve_version("580", "nvidia-smi", DEBIAN_APT)
    with pytest.raises(
        driver_plan.PlanError, match="branch 999: the host's apt sources offer no nvidia-utils-999-server$"
    ):
        driver_plan.resolve_version("999", "nvidia-utils-999-server", UBUNTU)


def test_ubuntu_precompiled_signed_module_for_the_kernel_flavour_no_dkms():
    plan = driver_plan.plan("distro", "Ubuntu", "580", "6.8.0-136-generic", "generic", UBUNTU, {})
    assert plan.version == "580.173.02"
    assert plan.packages == ["nvidia-headless-no-dkms-580-server", "nvidia-utils-580-server"]
    assert plan.modules == ["linux-modules-nvidia-580-server-generic"]  # it depends on the 136 ABI package
    assert (plan.dkms, plan.headers, plan.remove) == (False, None, [])


def test_ubuntu_hwe_flavour_takes_its_own_module_metapackage():
    plan = driver_plan.plan("distro", "Ubuntu", "580.173.02", "6.17.0-35-generic", "generic-hwe-24.04", UBUNTU, {})
    assert plan.modules == ["linux-modules-nvidia-580-server-generic-hwe-24.04"] and not plan.dkms


def test_ubuntu_running_kernel_older_than_the_newest_gets_its_own_module_too():
    """After an HWE kernel is installed and before the reboot: modules for both kernels."""
    plan = driver_plan.plan("distro", "Ubuntu", "580", "6.8.0-136-generic", "generic-hwe-24.04", UBUNTU, {})
    assert plan.modules == [
        "linux-modules-nvidia-580-server-generic-hwe-24.04",
        "linux-modules-nvidia-580-server-6.8.0-136-generic",
    ]


def test_ubuntu_kernel_without_a_precompiled_module_falls_back_to_dkms_with_headers():
    plan = driver_plan.plan("distro", "Ubuntu", "580", "6.8.0-137-generic", "generic", UBUNTU, {})
    assert plan.packages == ["nvidia-headless-no-dkms-580-server", "nvidia-utils-580-server", "nvidia-dkms-580-server"]
    assert (plan.dkms, plan.headers, plan.modules) == (True, "linux-headers-6.8.0-137-generic", [])
    assert "no precompiled module for 6.8.0-137-generic" in plan.notes[0]


def test_ubuntu_dkms_package_goes_when_a_precompiled_module_serves_again():
    plan = driver_plan.plan(
        "distro", "Ubuntu", "580", "6.8.0-136-generic", "generic", UBUNTU, {"nvidia-dkms-580-server": [V]}
    )
    assert plan.remove == ["nvidia-dkms-580-server"]


def test_ubuntu_precompiled_module_built_for_a_newer_driver_than_pinned_falls_back_to_dkms():
    older = {
        **UBUNTU,
        "nvidia-utils-580-server": {
            **UBUNTU["nvidia-utils-580-server"],
            "versions": [V, "580.159.03-0ubuntu0.24.04.1"],
        },
    }
    plan = driver_plan.plan("distro", "Ubuntu", "580.159.03", "6.8.0-136-generic", "generic", older, {})
    assert plan.dkms and "needs driver >= 580.173.02" in plan.notes[0]


def test_ubuntu_exact_version_the_archive_dropped_is_refused_naming_what_it_has():
    with pytest.raises(
        driver_plan.PlanError,
        match=rf"580.126.20 is not in the host's apt sources, and not installed: "
        rf"they offer nvidia-utils-580-server {V}\.",
    ):
        driver_plan.plan("distro", "Ubuntu", "580.126.20", "6.8.0-136-generic", "generic", UBUNTU, {})


def test_ubuntu_branch_that_became_transitional_is_refused():
    with pytest.raises(driver_plan.PlanError) as refused:
        driver_plan.plan("distro", "Ubuntu", "570", "6.8.0-136-generic", "generic", UBUNTU, {})
    assert str(refused.value) == (
        "nvidia-utils-570-server 570.211.01-0ubuntu1.24.04.1 is a transitional package "
        "(nvidia-utils-580-server): Ubuntu has moved branch 570 to another; pin that branch"
    )


def test_open_modules_use_ubuntus_open_flavour():
    plan = driver_plan.ubuntu("580", "580.173.02", "6.8.0-137-generic", "generic", UBUNTU, {}, open_modules=True)
    assert plan.packages == [
        "nvidia-headless-no-dkms-580-server-open",
        "nvidia-utils-580-server",
        "nvidia-dkms-580-server-open",
    ]
    assert (
        driver_plan.debian("535.261.03", "6.1.0-56-amd64", open_modules=True).packages[0] == "nvidia-open-kernel-dkms"
    )


def test_lxc_guest_gets_user_space_only():
    assert driver_plan.plan(
        "distro", "Debian", "535.261.03", "k", None, DEBIAN_APT, {}, kernel_module=False
    ).packages == ["nvidia-smi", "libcuda1"]
    assert driver_plan.plan("distro", "Ubuntu", "580", "k", None, UBUNTU, {}, kernel_module=False).packages == [
        "nvidia-utils-580-server",
        "libnvidia-compute-580-server",
    ]


def test_nvswitch_needs_fabric_manager_at_the_drivers_branch():
    apt = {
        **UBUNTU,
        "nvidia-fabricmanager-580": {
            "installed": None,
            "candidate": "580.173.02-0ubuntu0.24.04.1",
            "versions": [],
            "section": None,
            "depends": "",
        },
    }
    plan = driver_plan.plan("distro", "Ubuntu", "580", "6.8.0-136-generic", "generic", apt, {}, nvswitch=True)
    assert plan.packages[-1] == "nvidia-fabricmanager-580"
    with pytest.raises(
        driver_plan.PlanError, match="Debian's archive has none; use nvidia_driver_source = 'cuda-repo'"
    ):
        driver_plan.plan("distro", "Debian", "535.261.03", "k", None, DEBIAN_APT, {}, nvswitch=True)


def test_cuda_repo_driver_is_its_branch_metapackage_built_by_dkms():
    apt = {
        "cuda-drivers-580": {
            "installed": None,
            "candidate": "580.95.05-1",
            "versions": ["580.95.05-1"],
            "section": "multiverse/metapackages",
            "depends": "",
        }
    }
    plan = driver_plan.plan("cuda-repo", "Ubuntu", "580", "6.8.0-136-generic", "generic", apt, {})
    assert (plan.packages, plan.headers, plan.version) == (
        ["cuda-drivers-580"],
        "linux-headers-6.8.0-136-generic",
        "580.95.05",
    )


@pytest.mark.parametrize(
    "device, open_modules, message",
    [
        ("0x1db6", True, "GPU 0x1db6 at 0000:00:06.0 (GV100GL [Tesla V100 PCIe 32GB], Volta) is older than Turing"),
        ("0x2901", False, "GPU 0x2901 at 0000:00:06.0 (GB100 [B200], Blackwell) runs only with NVIDIA's open kernel"),
    ],
)
def test_open_or_proprietary_modules_refused_by_gpu_generation(device, open_modules, message):
    with pytest.raises(driver_plan.PlanError) as refused:
        driver_plan.check_kernel_module_kind([{"slot": "0000:00:06.0", "device": device}], open_modules)
    assert refused.value.field == "nvidia_driver_open" and str(refused.value).startswith(message)


def test_hopper_takes_either_kind_and_an_unknown_device_is_not_refused():
    for open_modules in (True, False):
        driver_plan.check_kernel_module_kind(
            [{"slot": "s", "device": "0x2330"}, {"slot": "t", "device": "0xffff"}], open_modules
        )


def test_kernel_flavour_is_the_meta_package_of_the_newest_installed_kernel():
    images = KernelImages().process(
        [
            "ii  linux-image-6.8.0-136-generic 6.8.0-136.136 kmod, linux-base (>= 4.5ubuntu1~16.04.1), linux-modules-6.8.0-136-generic",
            "ii  linux-image-generic 6.8.0-136.136 linux-image-6.8.0-136-generic",
            "un  linux-image-unsigned-6.8.0-136-generic  ",
        ]
    )
    assert images == {
        "images": {"6.8.0-136-generic": "6.8.0-136.136"},
        "metas": {"generic": ["linux-image-6.8.0-136-generic"]},
    }
    assert image_meta(images) == "generic"
    images["images"]["6.17.0-35-generic"] = "6.17.0-35.35~24.04.1"
    images["metas"]["generic-hwe-24.04"] = ["linux-image-6.17.0-35-generic"]
    assert image_meta(images) == "generic-hwe-24.04"


def test_module_packages_are_installed_never_held_and_a_superseded_one_removed(run_op):
    facts = {
        "DebPackages": {"nvidia-utils-580-server": [V], "nvidia-dkms-580-server": [V]},
        "AptHeldPackages": {"nvidia-utils-580-server", "nvidia-dkms-580-server"},
    }
    commands, _ = run_op(
        apt_pin.installed,
        facts,
        packages=["nvidia-utils-580-server"],
        version="580.173.02",
        pin_name="p",
        unversioned=["linux-modules-nvidia-580-server-generic"],
        remove=["nvidia-dkms-580-server"],
    )
    assert commands[-3] == (apt_pin.APT_INSTALL + " nvidia-utils-580-server linux-modules-nvidia-580-server-generic")
    assert commands[-2] == "apt-mark hold nvidia-utils-580-server"  # the install took its hold away
    assert commands[-1] == (
        "apt-mark unhold nvidia-dkms-580-server && DEBIAN_FRONTEND=noninteractive apt-get remove -y "
        "nvidia-dkms-580-server"
    )
    assert not any("hold linux-modules" in str(c) for c in commands)
