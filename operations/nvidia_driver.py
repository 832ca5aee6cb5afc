"""NVIDIA driver from the distro, NVIDIA's CUDA repository or a local repository: pinned, held,
nouveau blacklisted, Secure Boot checked, persistence mode, reboot only when needed and allowed."""

import re
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import apt, files, server, systemd

from . import apt_pin, base, config
from .errors import ConfigError, HostStateError
from .gpu_facts import KernelHeaders, NvidiaKernelModule, NvidiaPciDevices, SecureBoot

SOURCES = ("distro", "cuda-repo", "local-repo", "bundle")
CUDA_REPO_URL = "https://developer.download.nvidia.com/compute/cuda/repos/{distro}{release}/x86_64/"
CUDA_KEYRING = "/usr/share/keyrings/nvidia-cuda-archive-keyring.asc"  # apt reads armored .asc keys
PIN_PATTERNS = ["*nvidia*", "libcuda*", "libnvcuvid*", "libnvoptix*", "cuda-drivers*"]
NOUVEAU_BLACKLIST = "/etc/modprobe.d/gpufleet-blacklist-nouveau.conf"
PERSISTENCED_DROPIN = "/etc/systemd/system/nvidia-persistenced.service.d/gpufleet.conf"

DEFAULTS = {
    "nvidia_driver_source": "distro",
    "nvidia_driver_version": "535.261.03",
    "nvidia_driver_debian_mirror": "http://deb.debian.org/debian",
    "nvidia_driver_debian_security_mirror": "http://deb.debian.org/debian-security",
    "nvidia_driver_cuda_repo_url": None,
    "nvidia_driver_local_repo": "/var/lib/gpufleet/repo",
    "nvidia_driver_secure_boot_signed": False,
    "nvidia_driver_reboot": False,
    "nvidia_driver_reboot_timeout": 600,
}


def _check(data, host_name):
    version = data.get("nvidia_driver_version")
    if "nvidia_driver_version" in data and not re.fullmatch(r"\d{3}\.\d+(\.\d+)?", str(version or "")):
        raise ConfigError("nvidia_driver_version",
                          f"must be a pinned version such as '535.261.03', got {version!r}", host=host_name)


config.register({
    "nvidia_driver_source": (lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}"),
    "nvidia_driver_version": (lambda v: isinstance(v, str), "a pinned version string such as '535.261.03'"),
    "nvidia_driver_debian_mirror": (config._is_str, "a Debian mirror URL"),
    "nvidia_driver_debian_security_mirror": (config._is_str, "a Debian security mirror URL"),
    "nvidia_driver_cuda_repo_url": (config._is_str, "a URL of NVIDIA's CUDA apt repository"),
    "nvidia_driver_local_repo": (config._is_str, "a directory on the host holding a flat apt repository"),
    "nvidia_driver_secure_boot_signed": (config._is_bool, "true or false"),
    "nvidia_driver_reboot": (config._is_bool, "true or false"),
    "nvidia_driver_reboot_timeout": (config._is_positive_int, "seconds, above 0"),
}, cross_check=_check)


def branch(version):
    return version.split(".")[0]


def driver_packages(source, distro, version, kernel=None, precompiled=False, nvswitch=False,
                    kernel_module=True):
    """The packages that make up the driver for a source and distro (pure: unit-tested).

    Without the kernel module (an LXC guest, whose host owns it): only the user-space libraries
    and nvidia-smi, at exactly the given version.
    """
    major = branch(version)
    if not kernel_module:
        if source == "cuda-repo":
            raise ConfigError("nvidia_driver_source", "an LXC guest takes user-space libraries from 'distro', "
                              "'local-repo' or 'bundle'; NVIDIA's cuda-drivers packages bring a kernel module")
        if distro == "Ubuntu":
            return [f"nvidia-utils-{major}-server", f"libnvidia-compute-{major}-server"]
        return ["nvidia-smi", "libcuda1"]
    if source == "cuda-repo":
        packages = [f"cuda-drivers-{major}"]
    elif distro == "Ubuntu":
        packages = [f"nvidia-headless-{major}-server", f"nvidia-utils-{major}-server"]
        packages.append(f"linux-modules-nvidia-{major}-server-{kernel}" if precompiled
                        else f"nvidia-dkms-{major}-server")
    else:  # Debian's non-free driver: DKMS module, tools, CUDA library
        packages = ["nvidia-kernel-dkms", "nvidia-smi", "libcuda1"]
    if nvswitch:
        packages.append(f"nvidia-fabricmanager-{major}")
    return packages


def uses_dkms(packages):
    return not any(p.startswith("linux-modules-nvidia-") for p in packages)


def debian_nonfree_lines(mirror, security_mirror, codename):
    components = "contrib non-free non-free-firmware"
    return [f"deb {mirror} {codename} {components}",
            f"deb {mirror} {codename}-updates {components}",
            f"deb {security_mirror} {codename}-security {components}"]


@deploy("Install NVIDIA driver", data_defaults=DEFAULTS)
def install_driver(source=None, version=None, reboot=None, kernel_module=True):
    """
    Install the pinned NVIDIA driver, hold it, blacklist nouveau, and reboot only if needed and allowed.

    + source: ``distro`` (Debian non-free, Ubuntu server drivers), ``cuda-repo``, ``local-repo``
      or ``bundle`` (the offline bundle staged by ``offline.stage_packages``)
    + version: pinned upstream version (``nvidia_driver_version``)
    + reboot: allow a reboot when the driver or blacklist changed on a GPU host (``nvidia_driver_reboot``)
    + kernel_module: False for an LXC guest: user-space libraries only (its Proxmox host loads the
      module), no nouveau blacklist, persistence daemon or reboot

    Returns the package operation, so later steps can react to a driver change.
    """
    source = source or host.data.nvidia_driver_source
    version = version or host.data.nvidia_driver_version
    reboot = host.data.nvidia_driver_reboot if reboot is None else reboot
    distro = host.get_fact(LinuxDistribution)
    codename = (distro["release_meta"].get("VERSION_CODENAME") or "").lower()
    kernel = host.get_fact(KernelHeaders)["kernel"]
    nvswitch = any(d["kind"] == "nvswitch" for d in host.get_fact(NvidiaPciDevices))
    precompiled = distro["name"] == "Ubuntu" and source == "distro"  # signed modules, Ubuntu's own
    packages = driver_packages(source, distro["name"], version, kernel, precompiled, nvswitch, kernel_module)

    if kernel_module and uses_dkms(packages) and host.get_fact(SecureBoot) and not host.data.nvidia_driver_secure_boot_signed:
        raise HostStateError(
            f"{host.name}: Secure Boot is on and the {source} driver builds an unsigned DKMS module that "
            "the kernel would refuse to load. Enrol a MOK and let DKMS sign with it (mokutil --import "
            "/var/lib/dkms/mok.pub, reboot, confirm), then set nvidia_driver_secure_boot_signed = True; "
            "or, on Ubuntu, use nvidia_driver_source = 'distro' for Canonical's signed modules. Nothing was changed.")

    if source == "local-repo":
        repo = files.line(name="Add the local driver repository", path="/etc/apt/sources.list.d/gpufleet-local.list",
                          line=f"deb [trusted=yes] file:{host.data.nvidia_driver_local_repo} ./")
    elif source == "cuda-repo":
        url = host.data.nvidia_driver_cuda_repo_url or CUDA_REPO_URL.format(
            distro=distro["name"].lower(), release=distro["release_meta"].get("VERSION_ID", "").replace(".", ""))
        files.download(name="Download NVIDIA's CUDA repository key", src=f"{url}3bf863cc.pub",
                       dest=CUDA_KEYRING, mode="644")
        repo = files.line(name="Add NVIDIA's CUDA repository", path="/etc/apt/sources.list.d/nvidia-cuda.list",
                          line=f"deb [signed-by={CUDA_KEYRING}] {url} /")
    elif source == "bundle":
        repo = None  # offline.stage_packages staged the repository and updated apt's lists
    elif distro["name"] == "Debian":
        repo = files.put(name="Enable Debian's contrib, non-free and non-free-firmware",
                         src=StringIO("\n".join(debian_nonfree_lines(
                             host.data.nvidia_driver_debian_mirror,
                             host.data.nvidia_driver_debian_security_mirror, codename)) + "\n"),
                         dest="/etc/apt/sources.list.d/gpufleet-debian-nonfree.list", mode="644")
    else:
        repo = None
    if repo is not None:
        apt.update(name="Update apt lists after the driver source changed", _if=repo.did_change)

    what = "NVIDIA driver" if kernel_module else "NVIDIA user-space driver (no kernel module)"
    driver = apt_pin.installed(name=f"Install {what} {version} and hold it", packages=packages,
                               version=version, pin_name="gpufleet-nvidia-driver", pin_patterns=PIN_PATTERNS)
    files.put(name="Keep NVIDIA packages out of unattended upgrades",
              src=StringIO('Unattended-Upgrade::Package-Blacklist {\n    "nvidia-";\n    "libnvidia-";\n'
                        '    "libcuda";\n    "cuda-drivers";\n};\n'),
              dest="/etc/apt/apt.conf.d/51gpufleet-nvidia-no-unattended", mode="644")
    if not kernel_module:
        return driver

    blacklist = files.put(name="Blacklist nouveau", src=StringIO("blacklist nouveau\noptions nouveau modeset=0\n"),
                          dest=NOUVEAU_BLACKLIST, mode="644")
    server.shell(name="Rebuild the initramfs without nouveau", _if=blacklist.did_change,
                 commands=["if command -v update-initramfs >/dev/null; then update-initramfs -u; "
                           "else echo 'no initramfs-tools on this host: nothing to rebuild'; fi"])

    dropin = files.put(name="Run nvidia-persistenced in persistence mode",
                       src=StringIO("[Service]\nExecStart=\nExecStart=/usr/bin/nvidia-persistenced "
                                 "--user nvidia-persistenced --persistence-mode --verbose\n"),
                       dest=PERSISTENCED_DROPIN, mode="644")
    systemd.daemon_reload(name="Reload systemd after the persistenced drop-in changed", _if=dropin.did_change)

    if not base.gpus():
        return driver
    apt.packages(name="Install nvidia-persistenced", packages=["nvidia-persistenced"], no_recommends=True)
    systemd.service(name="Enable nvidia-persistenced", service="nvidia-persistenced", running=True,
                    enabled=True, restarted=dropin.will_change)
    loaded = host.get_fact(NvidiaKernelModule)
    stale = loaded is not None and loaded["version"] != version
    if driver.will_change or blacklist.will_change or stale:
        why = f"loaded module {loaded['version']} is not {version}" if stale else "driver or nouveau blacklist changed"
        if reboot and host.connector_cls.__name__ != "LocalConnector":
            server.reboot(name=f"Reboot to load NVIDIA driver {version} ({why})",
                          reboot_timeout=host.data.nvidia_driver_reboot_timeout)
        else:
            logger.warning(f"[{host.name}] reboot needed to load NVIDIA driver {version} ({why}); "
                           "not rebooting: set nvidia_driver_reboot = True to allow it")
    return driver
