"""The NVIDIA driver as each distribution ships it. lab-ubu-1 is the Ubuntu 24.04-shaped host (an
archive built from Ubuntu's real package records, a running kernel named by a file:
tests/fixtures/ubuntu_double, tests/fixtures/running_kernel): Canonical's precompiled module
packages for its kernel flavour, DKMS only where its kernel has none. lab-2 runs Debian's real
packages and builds the module with DKMS against Debian's real kernel headers. Bad pins are refused
before any host changes; Secure Boot is gated on how the module comes."""

import re

import pytest

from operations.driver.facts import release_key
from tests.fixtures import mokutil
from tests.lab import hosts as lab_hosts

from .conftest import run_deploy

UBUNTU = "lab-ubu-1"
GA_KERNEL = "6.8.0-136-generic"
HWE_KERNEL = "6.17.0-35-generic"
NO_PRECOMPILED_KERNEL = "6.8.0-137-generic"  # in the archive, with no linux-modules-nvidia-580-server-* for it
DRIVER = "580.173.02"  # nvidia-utils-580-server's newest in the capture (tests/data/ubuntu/noble-archive.txt)
DEBIAN_DRIVER = "535.261.03"
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0"


def sh(name, command, check=True):
    return lab_hosts.ssh({"name": name}, command, check=check).stdout


def installed(name, pattern):
    """{package: version} of the installed packages matching a grep -E pattern."""
    out = sh(name, "dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n'")
    return {
        p: v
        for status, p, v in (line.split() for line in out.splitlines())
        if status[1] == "i" and re.search(pattern, p)
    }


def module_version(name, kernel):
    return sh(name, f"modinfo -k {kernel} -F version nvidia nvidia-current 2>/dev/null | head -n1", check=False).strip()


def run_kernel(release):
    sh(UBUNTU, f"echo {release} > /etc/gpufleet-lab/kernel-release")
    assert sh(UBUNTU, "uname -r").strip() == release


def restore_ubuntu_host():
    """Back to the GA kernel only, as the lab brought the host up: a deploy then changes nothing."""
    run_kernel(GA_KERNEL)
    extra = sh(
        UBUNTU, "dpkg-query -W -f '${Package}\\n' | grep -E '6\\.17\\.0-35|hwe-24\\.04|6\\.8\\.0-137|^dkms$' || true"
    ).split()
    if extra:
        sh(UBUNTU, f"{APT} purge {' '.join(extra)} >/dev/null")
    again = run_deploy("--limit", UBUNTU)
    assert again.rc == 0 and again.total_changed() == 0, (again.changed(), again.output[-3000:])


def test_ubuntu_host_gets_canonicals_precompiled_module_not_dkms(second_deploy):
    packages = installed(UBUNTU, "nvidia|dkms")
    assert packages["nvidia-headless-no-dkms-580-server"].startswith(DRIVER + "-")
    assert packages["nvidia-utils-580-server"].startswith(DRIVER + "-")
    assert packages["linux-modules-nvidia-580-server-generic"].startswith("6.8.0-136.")
    assert packages[f"linux-modules-nvidia-580-server-{GA_KERNEL}"].startswith("6.8.0-136.")
    assert not [p for p in packages if p.startswith("nvidia-dkms-") or p == "dkms"], packages
    held = set(sh(UBUNTU, "apt-mark showhold").split())
    assert {"nvidia-headless-no-dkms-580-server", "nvidia-utils-580-server"} <= held
    assert not [p for p in held if p.startswith("linux-")], held  # kernel upgrades bring their module
    assert module_version(UBUNTU, GA_KERNEL) == DRIVER
    assert (
        f"[{UBUNTU}] NVIDIA driver {DRIVER} (580 pinned): Canonical's signed precompiled module for "
        f"{GA_KERNEL}: linux-modules-nvidia-580-server-generic" in second_deploy.output
    )


def test_hwe_kernel_gets_the_hwe_flavours_module(second_deploy):
    try:
        sh(UBUNTU, f"{APT} install linux-generic-hwe-24.04 >/dev/null")
        run_kernel(HWE_KERNEL)
        moved = run_deploy("--limit", UBUNTU)
        assert moved.rc == 0, moved.output[-3000:]
        assert (
            "Canonical's signed precompiled module for 6.17.0-35-generic: "
            "linux-modules-nvidia-580-server-generic-hwe-24.04" in moved.output
        )
        packages = installed(UBUNTU, "^linux-modules-nvidia-")
        assert "linux-modules-nvidia-580-server-generic-hwe-24.04" in packages
        assert f"linux-modules-nvidia-580-server-{HWE_KERNEL}" in packages
        assert module_version(UBUNTU, HWE_KERNEL) == DRIVER
        again = run_deploy("--limit", UBUNTU)
        assert again.rc == 0 and again.total_changed() == 0, again.changed()
    finally:
        restore_ubuntu_host()


def test_kernel_without_precompiled_module_falls_back_to_dkms_and_names_its_build_log(second_deploy):
    """The double's NVIDIA source builds nothing: the run fails on the module check, naming DKMS's log.
    Back on a kernel with a precompiled module, the DKMS package is removed again."""
    try:
        sh(UBUNTU, f"{APT} install linux-image-{NO_PRECOMPILED_KERNEL} >/dev/null")
        run_kernel(NO_PRECOMPILED_KERNEL)
        fallback = run_deploy("--limit", UBUNTU)
        assert fallback.rc != 0
        assert (
            f"no precompiled module for {NO_PRECOMPILED_KERNEL} (linux-modules-nvidia-580-server-"
            f"{NO_PRECOMPILED_KERNEL} is not in the host's apt sources): DKMS builds it (nvidia-dkms-580-server, "
            f"linux-headers-{NO_PRECOMPILED_KERNEL})" in fallback.output
        )
        assert (
            f"NVIDIA module {DRIVER} is not built for the running kernel {NO_PRECOMPILED_KERNEL} (found: none); "
            f"DKMS build log: /var/lib/dkms/nvidia-srv/{DRIVER}/build/make.log" in fallback.output
        )
        packages = installed(UBUNTU, "nvidia-dkms|^linux-headers-6\\.8\\.0-137")
        assert packages["nvidia-dkms-580-server"].startswith(DRIVER + "-")
        assert f"linux-headers-{NO_PRECOMPILED_KERNEL}" in packages
        assert "nvidia-dkms-580-server" in sh(UBUNTU, "apt-mark showhold").split()

        run_kernel(GA_KERNEL)
        back = run_deploy("--limit", UBUNTU)
        assert back.rc == 0, back.output[-3000:]
        assert back.total_changed() == 1, back.changed()  # the driver operation, removing nvidia-dkms-580-server
        assert "nvidia-dkms-580-server" not in installed(UBUNTU, "nvidia-dkms")
        assert sh(UBUNTU, "dkms status -m nvidia-srv").strip() == ""
    finally:
        restore_ubuntu_host()


def test_a_next_kernel_without_its_module_is_named_before_the_reboot(second_deploy):
    """Ubuntu's real records: a kernel Canonical published no precompiled module for (6.8.0-137) is
    installed beside the running GA kernel, and the host would boot it next. The run names it with
    the ways out, before any reboot (without a GPU nothing is lost: a warning, not a failure), and
    changes nothing."""
    try:
        sh(UBUNTU, f"{APT} install linux-image-{NO_PRECOMPILED_KERNEL} >/dev/null")
        assert sh(UBUNTU, "uname -r").strip() == GA_KERNEL
        named = run_deploy("--limit", UBUNTU)
        assert named.rc == 0, named.output[-3000:]
        assert (
            f"the kernel this host boots next, {NO_PRECOMPILED_KERNEL}, has no NVIDIA module {DRIVER}: no "
            f"precompiled module for {NO_PRECOMPILED_KERNEL} (linux-modules-nvidia-580-server-"
            f"{NO_PRECOMPILED_KERNEL} is not in the host's apt sources). Before rebooting, choose" in named.output
        ), named.output[-3000:]
        assert named.total_changed() == 0, named.changed()
    finally:
        restore_ubuntu_host()


def _refused(result, message):
    assert result.rc != 0, result.output[-2000:]
    assert message in result.output, result.output[-3000:]
    assert "Starting operation" not in result.output


@pytest.mark.parametrize(
    "name, pin, message",
    [
        (
            UBUNTU,
            "580.126.20",
            "lab-ubu-1: nvidia_driver_version: 580.126.20 is not in the host's apt sources, and not "
            "installed: they offer nvidia-utils-580-server 580.173.02-0ubuntu0.24.04.1. Pin one of "
            "those, or the branch ('580') to take its newest",
        ),
        (
            UBUNTU,
            "570",
            "lab-ubu-1: nvidia_driver_version: nvidia-utils-570-server 570.211.01-0ubuntu1.24.04.1 is a "
            "transitional package (nvidia-utils-580-server): Ubuntu has moved branch 570 to another; "
            "pin that branch",
        ),
        (
            UBUNTU,
            "999",
            "lab-ubu-1: nvidia_driver_version: branch 999: the host's apt sources offer no nvidia-utils-999-server",
        ),
        (
            "lab-2",
            "535.183.01",
            "lab-2: nvidia_driver_version: 535.183.01 is not in the host's apt sources, and not "
            "installed: they offer nvidia-smi 535.309.01-0+deb12u1, 535.261.03-1.",
        ),
    ],
)
def test_a_pin_the_host_cannot_have_is_refused_before_any_host_changes(second_deploy, name, pin, message):
    before = sh(name, "stat -c %Y /etc/apt/preferences.d/gpufleet-nvidia-driver")
    _refused(run_deploy("--limit", name, "--data", f'nvidia_driver_version="{pin}"'), message)
    assert sh(name, "stat -c %Y /etc/apt/preferences.d/gpufleet-nvidia-driver") == before


def test_debian_module_built_by_dkms_against_the_real_headers(second_deploy):
    kernel = sh("lab-2", "uname -r").strip()
    assert kernel.endswith("-amd64") and kernel != sh("lab-2", "/usr/bin/uname -r").strip()
    assert f"linux-headers-{kernel}" in installed("lab-2", "^linux-headers-")
    assert (
        sh("lab-2", "dkms status nvidia-current")
        .strip()
        .startswith(f"nvidia-current/{DEBIAN_DRIVER}, {kernel}, x86_64: installed")
    )
    assert module_version("lab-2", kernel) == DEBIAN_DRIVER
    vermagic = sh("lab-2", f"modinfo -k {kernel} -F vermagic nvidia-current").split()[0]
    assert vermagic == kernel  # compiled against that kernel's real headers, not faked
    assert (
        sh(
            "lab-2",
            f"test -s /var/lib/dkms/nvidia-current/{DEBIAN_DRIVER}/{kernel}/x86_64/module/nvidia-current.ko"
            " && echo built",
        ).strip()
        == "built"
    )


def test_debian_headers_meta_keeps_the_next_kernels_headers_coming(second_deploy):
    """Debian's headers meta package of the running kernel's flavour is installed with the driver, so
    the headers of every kernel apt installs later arrive with it, and DKMS builds the module for that
    kernel before the host boots it."""
    kernel = sh("lab-2", "uname -r").strip()
    metas = installed("lab-2", "^linux-headers-amd64$")
    assert list(metas) == ["linux-headers-amd64"]
    depends = sh("lab-2", "dpkg-query -W -f '${Depends}' linux-headers-amd64")
    assert depends.startswith(f"linux-headers-{kernel} ("), depends  # the lab runs Debian's current ABI


MODULE_CHECK = "GPU host | Install NVIDIA driver | Check the NVIDIA module is built for the running kernel and the one it boots next"


def older_debian_abi(name, current):
    """The newest Debian kernel ABI older than ``current`` whose headers the host's apt offers (6.1.0-56-amd64)."""
    names = sh(name, "apt-cache pkgnames linux-headers-6. | grep -E '^linux-headers-[0-9.]+-[0-9]+-amd64$' || true")
    abis = [package[len("linux-headers-") :] for package in names.split()]
    return max((abi for abi in abis if release_key(abi) < release_key(current)), key=release_key)


def test_a_new_kernel_gets_its_module_before_the_host_boots_it(second_deploy):
    """Debian's real packages: the host runs last month's kernel; apt brings the new kernel's image
    (its module missing, as when DKMS's hook failed); the next run builds the module for the kernel
    the host boots next, before any reboot; once the host runs it, nothing is left to do and it serves."""
    new = sh("lab-2", "uname -r").strip()  # Debian's current ABI: what linux-headers-amd64 brings
    old = older_debian_abi("lab-2", new)
    try:
        sh("lab-2", f"echo {old} > /etc/gpufleet-lab/kernel-release")
        running_old = run_deploy("--limit", "lab-2")
        assert running_old.rc == 0, running_old.output[-3000:]
        assert f"linux-headers-{old}" in installed("lab-2", "^linux-headers-")
        assert module_version("lab-2", old) == DEBIAN_DRIVER  # built by DKMS when its headers came

        sh("lab-2", f"{APT} install --no-install-recommends linux-image-{new} >/dev/null")
        sh("lab-2", f"dkms remove nvidia-current/{DEBIAN_DRIVER} -k {new} >/dev/null")
        assert module_version("lab-2", new) == ""
        built = run_deploy("--limit", "lab-2")
        assert built.rc == 0, built.output[-3000:]
        assert built.total_changed() == 1 and MODULE_CHECK in built.changed(), built.changed()
        assert module_version("lab-2", new) == DEBIAN_DRIVER
        assert sh("lab-2", f"modinfo -k {new} -F vermagic nvidia-current").split()[0] == new

        sh("lab-2", f"echo {new} > /etc/gpufleet-lab/kernel-release")  # the host reboots into it
        booted = run_deploy("--limit", "lab-2")
        assert booted.rc == 0 and booted.total_changed() == 0, booted.changed()
        assert sh("lab-2", "curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8080/health") == "200"
    finally:  # the old kernel goes (its module first); the new one's image stays, as on a real host that
        # runs it (purging it would make DKMS's prerm hook remove the running kernel's module)
        sh("lab-2", f"echo {new} > /etc/gpufleet-lab/kernel-release")
        common = f"linux-headers-{old.rsplit('-', 1)[0]}-common"
        sh(
            "lab-2",
            f"dkms remove nvidia-current/{DEBIAN_DRIVER} -k {old} >/dev/null 2>&1; "
            f"{APT} purge linux-headers-{old} {common} >/dev/null; rm -rf /lib/modules/{old}",
            check=False,
        )
    again = run_deploy("--limit", "lab-2")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


@pytest.mark.parametrize("name, user", [("lab-2", "nvpd"), (UBUNTU, "nvidia-persistenced")])
def test_persistenced_runs_as_its_distributions_user(second_deploy, name, user):
    dropin = sh(name, "cat /etc/systemd/system/nvidia-persistenced.service.d/gpufleet.conf")
    assert f"ExecStart=/usr/bin/nvidia-persistenced --user {user} --persistence-mode --verbose" in dropin
    if name == UBUNTU:  # the package is installed here (nvidia-compute-utils-580-server) and made its user
        assert f"--user {user}" in sh(name, "cat /lib/systemd/system/nvidia-persistenced.service")
        assert sh(name, f"id -u {user}").strip().isdigit()


def test_secure_boot_refuses_an_unsigned_dkms_module_not_a_signed_precompiled_one(second_deploy):
    try:
        for name in ("lab-2", UBUNTU):
            mokutil.install(f"gpufleet-{name}", "enabled")
        _refused(
            run_deploy("--limit", "lab-2"),
            "lab-2: Secure Boot is on and the distro driver's module is built by DKMS, unsigned, for 6.1.0-",
        )
        ubuntu = run_deploy("--limit", UBUNTU)
        assert ubuntu.rc == 0 and ubuntu.total_changed() == 0, ubuntu.output[-3000:]
        # shim's validation disabled by the user: Linux boots with Secure Boot off, unsigned modules load.
        mokutil.install("gpufleet-lab-2", "shim-validation-off")
        debian = run_deploy("--limit", "lab-2")
        assert debian.rc == 0 and debian.total_changed() == 0, debian.output[-3000:]
    finally:
        for name in ("lab-2", UBUNTU):
            mokutil.remove(f"gpufleet-{name}")
