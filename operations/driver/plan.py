"""
Which packages make up the NVIDIA driver on a host, at which version, and how its kernel module
comes (pure: given what apt offers and what the host is, unit-tested).

- Ubuntu, ``distro``: as ubuntu-drivers does for a server (UbuntuDrivers/detect.py, ``--gpgpu``):
  ``nvidia-headless-no-dkms-<branch>-server`` + ``nvidia-utils-<branch>-server`` and Canonical's
  signed precompiled module metapackage ``linux-modules-nvidia-<branch>-server-<flavour>`` for the
  kernel meta package installed (generic, generic-hwe-24.04, ...), so that kernel upgrades bring
  their module; ``nvidia-dkms-<branch>-server`` and the running kernel's headers only when no
  precompiled module exists for the running kernel.
- Debian: the non-free DKMS driver and the running kernel's headers (a Proxmox VE host: its own).
- NVIDIA's CUDA repository: ``cuda-drivers-<branch>`` (DKMS).
Module packages are installed but never held or version-checked: they carry the kernel's version.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from operations.driver.facts import upstream

# NVIDIA PCI device ids -> chip and generation, from pci.ids (scripts/gpu-generations.py).
GENERATIONS = json.loads(Path(__file__).resolve().with_name("nvidia_generations.json").read_text())


EXACT = re.compile(r"\d{3}\.\d+(\.\d+)?")
# A distribution kernel's release: upstream version, ABI number, flavour (6.1.0-57-amd64, 6.1.0-57-cloud-amd64).
KERNEL_FLAVOUR = re.compile(r"^\d+\.\d+\.\d+-\d+-(.+)$")


class PlanError(Exception):
    """The driver cannot be planned as asked; ``field`` names the setting to change."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


@dataclass
class DriverPlan:
    version: str
    packages: list  # installed at ``version``, held, their kin pinned
    modules: list = field(default_factory=list)  # precompiled modules: never held, any version
    headers: str = None  # the kernel headers package DKMS builds against
    dkms: bool = False
    remove: list = field(default_factory=list)  # a superseded way of getting the module
    notes: list = field(default_factory=list)
    apt: dict = field(default_factory=dict)  # what apt said of each package asked about when planning (None: unknown)
    header_metas: list = field(default_factory=list)  # headers meta packages: the next kernels' headers come too
    # other installed kernels that cannot have the precompiled module at ``version``: kernel -> why
    unmodulated: dict = field(default_factory=dict)


def version_key(version):
    return tuple(int(part) for part in re.findall(r"\d+", version))


def branch_of(requested):
    return requested.split(".")[0]


def anchor(source, distro, branch, kernel_module=True):
    """The package whose version is the driver's version (the one a pin is checked on)."""
    if source == "cuda-repo" and kernel_module:
        return f"cuda-drivers-{branch}"
    if distro == "Ubuntu":
        return f"nvidia-utils-{branch}-server"
    return "nvidia-smi"


def resolve_version(requested, anchor_name, apt, field="nvidia_driver_version"):
    """
    The exact upstream version to install: an exact request as asked, when the host has it or apt
    offers it; a branch: what the host already has of it (held), else the newest apt offers.
    """
    info = apt.get(anchor_name)
    installed = upstream(info["installed"]) if info and info["installed"] else None
    offered = [upstream(version) for version in (info or {}).get("versions", [])]
    listing = ", ".join(dict.fromkeys((info or {}).get("versions", []))) or "none"
    if EXACT.fullmatch(requested):
        if requested == installed or requested in offered:
            return requested
        raise PlanError(
            field,
            f"{requested} is not in the host's apt sources, and not installed: they offer "
            f"{anchor_name} {listing}. Pin one of those, or the branch "
            f"({branch_of(requested)!r}) to take its newest",
        )
    if installed and branch_of(installed) == requested:
        return installed
    newest = newest_of_branch(requested, anchor_name, apt)
    if newest is None:
        raise PlanError(
            field,
            f"branch {requested}: the host's apt sources offer no {anchor_name}"
            f"{f' of that branch (they have {listing})' if info else ''}",
        )
    return newest


def newest_of_branch(branch, anchor_name, apt):
    """The newest upstream version of ``branch`` apt offers for ``anchor_name`` (None: none). A branch
    pin keeps the point release a host has in ``deploy.py``; ``upgrade.py`` rolls it to this one."""
    offered = [upstream(version) for version in (apt.get(anchor_name) or {}).get("versions", [])]
    matching = [version for version in offered if branch_of(version) == branch]
    return max(matching, key=version_key) if matching else None


def transitional(info):
    """A package Ubuntu keeps only to move users to another branch (Section oldlibs)."""
    return bool(info) and (info.get("section") or "").endswith("oldlibs")


def _offered(apt, name):
    info = apt.get(name)
    return bool(info) and bool(info["candidate"] or info["installed"])


def _minimum_common(info, flavour):
    """The driver version (``nvidia-kernel-common-<flavour> (>= X)``) a precompiled module package needs."""
    match = re.search(
        rf"nvidia-kernel-common-{re.escape(flavour)} \(>= (\d+(?:\.\d+)*)", (info or {}).get("depends", "")
    )
    return match.group(1) if match else None


def precompiled_gap(flavour, version, kernel, apt):
    """Why ``kernel`` cannot have Canonical's precompiled module at ``version`` (None: it can): none
    published for it, or one built for a newer point release than the pin."""
    abi = f"linux-modules-nvidia-{flavour}-{kernel}"
    if not _offered(apt, abi):
        return f"no precompiled module for {kernel} ({abi} is not in the host's apt sources)"
    needed = _minimum_common(apt.get(abi), flavour)
    if needed and version_key(version) < version_key(needed):
        return f"{abi} needs driver >= {needed}, and the pin holds {version}"
    return None


def ubuntu(branch, version, kernel, meta, apt, installed, open_modules=False, kernels=()):
    """Ubuntu's server driver: precompiled signed modules when the running kernel has them, else DKMS.
    The other installed ``kernels`` that cannot have the precompiled module are named in ``unmodulated``."""
    plan = _ubuntu_for_running(branch, version, kernel, meta, apt, installed, open_modules)
    if not plan.dkms:
        flavour = f"{branch}-server" + ("-open" if open_modules else "")
        gaps = {other: precompiled_gap(flavour, version, other, apt) for other in kernels if other != kernel}
        plan.unmodulated = {other: why for other, why in gaps.items() if why}
    return plan


def _ubuntu_for_running(branch, version, kernel, meta, apt, installed, open_modules=False):
    flavour = f"{branch}-server" + ("-open" if open_modules else "")
    packages = [f"nvidia-headless-no-dkms-{flavour}", f"nvidia-utils-{branch}-server"]
    abi = f"linux-modules-nvidia-{flavour}-{kernel}"
    meta_package = f"linux-modules-nvidia-{flavour}-{meta}" if meta else None
    dkms_package = f"nvidia-dkms-{flavour}"
    plan = DriverPlan(version=version, packages=packages)
    needed = _minimum_common(apt.get(abi), flavour)
    if _offered(apt, abi) and (needed is None or version_key(version) >= version_key(needed)):
        plan.modules = [meta_package] if meta_package and _offered(apt, meta_package) else []
        if abi not in apt.get(meta_package or "", {}).get("depends", ""):
            plan.modules.append(abi)
        plan.remove = [dkms_package] if dkms_package in installed else []
        plan.notes.append(f"Canonical's signed precompiled module for {kernel}: {', '.join(plan.modules)}")
        return plan
    why = (
        f"{abi} needs driver >= {needed}"
        if _offered(apt, abi)
        else f"no precompiled module for {kernel} ({abi} is not in the host's apt sources)"
    )
    plan.packages.append(dkms_package)
    plan.headers, plan.dkms = f"linux-headers-{kernel}", True
    plan.notes.append(f"{why}: DKMS builds it ({dkms_package}, linux-headers-{kernel})")
    return plan


def debian(version, kernel, open_modules=False, proxmox=None):
    """Debian's non-free driver, its module built by DKMS against the running kernel's headers."""
    dkms_package = "nvidia-open-kernel-dkms" if open_modules else "nvidia-kernel-dkms"
    headers = f"linux-headers-{kernel}"
    if proxmox:
        headers = f"{'proxmox' if proxmox >= 8 else 'pve'}-headers-{kernel}"
    return DriverPlan(
        version=version,
        packages=[dkms_package, "nvidia-smi", "libcuda1"],
        headers=headers,
        dkms=True,
        notes=[f"DKMS builds the module ({dkms_package}, {headers})"],
    )


def userspace(distro, branch, version):
    """An LXC guest: user-space libraries and nvidia-smi only (its host loads the module)."""
    if distro == "Ubuntu":
        return DriverPlan(
            version=version, packages=[f"nvidia-utils-{branch}-server", f"libnvidia-compute-{branch}-server"]
        )
    return DriverPlan(version=version, packages=["nvidia-smi", "libcuda1"])


def fabric_manager(source, distro, branch, apt):
    """The Fabric Manager package NVSwitch systems need, at the driver's version."""
    for name in (f"nvidia-fabricmanager-{branch}", "nvidia-fabricmanager"):
        if _offered(apt, name) and (
            name.endswith(branch) or branch_of(upstream(apt[name]["candidate"] or apt[name]["installed"])) == branch
        ):
            return name
    where = (
        "Debian's archive has none; use nvidia_driver_source = 'cuda-repo'"
        if (distro == "Debian" and source != "cuda-repo")
        else f"the host's apt sources offer no nvidia-fabricmanager-{branch}"
    )
    raise PlanError(
        "nvidia_driver_source",
        f"this host has NVSwitches, which need NVIDIA Fabric Manager at the driver's version: {where}",
    )


def header_meta_names(distro, kernels, proxmox=None):
    """
    The headers meta packages that make DKMS's build tree come with every kernel apt installs later
    (DKMS builds the module for a kernel when its headers arrive): Debian's ``linux-headers-<flavour>``
    of each installed kernel's flavour (amd64, cloud-amd64, rt-amd64), Proxmox VE's
    ``proxmox-default-headers`` (``pve-headers`` before 8). Ubuntu's precompiled modules need none.
    """
    if proxmox:
        return ["proxmox-default-headers" if proxmox >= 8 else "pve-headers"]
    if distro != "Debian":
        return []
    return sorted({f"linux-headers-{match.group(1)}" for kernel in kernels if (match := KERNEL_FLAVOUR.match(kernel))})


def relevant_packages(source, distro, branch, kernel, meta, open_modules=False, proxmox=None, kernels=()):
    """Every package name the plan may ask apt about."""
    if distro == "Ubuntu" and source != "cuda-repo":
        flavour = f"{branch}-server" + ("-open" if open_modules else "")
        names = [
            f"nvidia-utils-{branch}-server",
            f"nvidia-headless-no-dkms-{flavour}",
            f"nvidia-dkms-{flavour}",
            f"linux-modules-nvidia-{flavour}-{kernel}",
            f"linux-headers-{kernel}",
        ]
        if meta:
            names.append(f"linux-modules-nvidia-{flavour}-{meta}")
        names += [f"linux-modules-nvidia-{flavour}-{other}" for other in kernels if other != kernel]
    elif source == "cuda-repo":
        names = [f"cuda-drivers-{branch}", f"linux-headers-{kernel}"]
    else:
        names = ["nvidia-smi", debian("0", kernel, open_modules, proxmox).headers]
    metas = header_meta_names(distro, [kernel, *kernels], proxmox)
    return names + [f"nvidia-fabricmanager-{branch}", "nvidia-fabricmanager"] + metas


def plan(
    source,
    distro,
    requested,
    kernel,
    meta,
    apt,
    installed,
    open_modules=False,
    nvswitch=False,
    kernel_module=True,
    proxmox=None,
    kernels=(),
):
    """The driver for a host, or PlanError naming the setting to change. ``kernels``: the other kernels
    installed (their flavours' headers meta packages come with a DKMS plan)."""
    branch = branch_of(requested)
    if not kernel_module and source == "cuda-repo":
        raise PlanError(
            "nvidia_driver_source",
            "an LXC guest takes user-space libraries from 'distro', 'local-repo' "
            "or 'bundle'; NVIDIA's cuda-drivers packages bring a kernel module",
        )
    anchor_name = anchor(source, distro, branch, kernel_module)
    if transitional(apt.get(anchor_name)):
        info = apt[anchor_name]
        raise PlanError(
            "nvidia_driver_version",
            f"{anchor_name} {info['candidate']} is a transitional package "
            f"({info['depends']}): Ubuntu has moved branch {branch} to another; pin that branch",
        )
    version = resolve_version(requested, anchor_name, apt)
    if not kernel_module:
        return userspace(distro, branch, version)
    if source == "cuda-repo":
        result = DriverPlan(
            version=version,
            packages=[anchor_name],
            headers=f"linux-headers-{kernel}",
            dkms=True,
            notes=[f"NVIDIA's {anchor_name}: DKMS builds the module"],
        )
    elif distro == "Ubuntu":
        result = ubuntu(branch, version, kernel, meta, apt, installed, open_modules, kernels)
    else:
        result = debian(version, kernel, open_modules, proxmox)
    if nvswitch:
        result.packages.append(fabric_manager(source, distro, branch, apt))
    if result.dkms:
        result.header_metas = [
            name for name in header_meta_names(distro, [kernel, *kernels], proxmox) if _offered(apt, name)
        ]
        if result.header_metas:
            result.notes.append(f"the next kernels' headers come with {', '.join(result.header_metas)}")
    return result


def generation(device):
    """``{"chip", "name", "generation"}`` of a PCI device id such as ``0x2330``, or None when unknown."""
    return GENERATIONS["devices"].get(device.lower())


def check_kernel_module_kind(gpus, open_modules):
    """NVIDIA's open kernel modules run on Turing and later only; Blackwell runs on them only."""
    order = GENERATIONS["order"]
    for gpu in gpus:
        known = generation(gpu["device"])
        if known is None:
            continue
        described = f"GPU {gpu['device']} at {gpu['slot']} ({known['name']}, {known['generation']})"
        if open_modules and order.index(known["generation"]) < order.index("Turing"):
            raise PlanError(
                "nvidia_driver_open",
                f"{described} is older than Turing: NVIDIA's open kernel modules "
                "do not support it; set nvidia_driver_open = False",
            )
        if not open_modules and known["generation"] == "Blackwell":
            raise PlanError(
                "nvidia_driver_open",
                f"{described} runs only with NVIDIA's open kernel modules: set nvidia_driver_open = True",
            )
