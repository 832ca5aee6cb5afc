"""NVIDIA driver from the distro, NVIDIA's CUDA repository or a local repository: pinned (a branch or
an exact version), held, nouveau blacklisted, its kernel module precompiled (Ubuntu's signed ones)
or built by DKMS against the running kernel's headers and checked, Secure Boot gated, persistence
mode, Fabric Manager on NVSwitch systems, reboot only when needed and allowed.

What is installed comes from ``driver_plan`` (pure), fed with what apt offers on the host. The plan
is made when the deploy is planned, to refuse bad input before any host changes, and again when its
operations run, after the driver's apt sources are in place."""

import re
import shlex
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import OperationError, deploy, operation
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import File
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import apt, files, server, systemd

from operations import TEMPLATES
from operations.core import apt_pin, apt_sources, host_memo, settings
from operations.core.errors import ConfigError, HostStateError
from operations.core.host_memo import until_changed
from operations.driver import devices
from operations.driver import plan as driver_plan
from operations.driver.devices import (
    InstalledKernels,
    KernelHeaders,
    NvidiaKernelModule,
    NvidiaPciDevices,
    SecureBoot,
    next_boot,
)
from operations.driver.facts import AptPackages, KernelImages, NvidiaModuleFor, PersistencedUser, image_meta, upstream
from operations.offline import from_bundle as offline
from operations.proxmox.facts import PveVersion

CUDA_REPO_URL = "https://developer.download.nvidia.com/compute/cuda/repos/{distro}{release}/x86_64/"
CUDA_KEYRING = "/usr/share/keyrings/nvidia-cuda-archive-keyring.asc"  # apt reads armored .asc keys
SOURCE_LISTS = {
    "local-repo": "/etc/apt/sources.list.d/gpufleet-local.list",
    "cuda-repo": "/etc/apt/sources.list.d/nvidia-cuda.list",
    "distro": "/etc/apt/sources.list.d/gpufleet-debian-nonfree.list",
}
# The two kernels the module is checked for, as messages name them.
RUNNING, BOOTS_NEXT = "the running kernel", "the kernel this host boots next"
# Builds the module with DKMS for a kernel and checks modinfo says the wanted version (sent inline).
MODULE_CHECK = (TEMPLATES / "gpufleet-module-check").read_text()
PIN_PATTERNS = ["*nvidia*", "libcuda*", "libnvcuvid*", "libnvoptix*", "cuda-drivers*"]
NOUVEAU_BLACKLIST = "/etc/modprobe.d/gpufleet-blacklist-nouveau.conf"
UNATTENDED_BLACKLIST = "/etc/apt/apt.conf.d/51gpufleet-nvidia-no-unattended"
PERSISTENCED_DROPIN = "/etc/systemd/system/nvidia-persistenced.service.d/gpufleet.conf"
# The user each distro's nvidia-persistenced package creates (and its unit passes to --user):
# Debian's nvidia-persistenced postinst makes nvpd; Ubuntu's nvidia-compute-utils-<branch> makes
# nvidia-persistenced. The installed unit, when there is one, says it for certain.
PERSISTENCED_USERS = {"Debian": "nvpd", "Ubuntu": "nvidia-persistenced"}
VERSION = re.compile(r"\d{3}(\.\d+){0,2}")


def check_version(data, host_name):
    version = data.get("nvidia_driver_version")
    if "nvidia_driver_version" in data and not VERSION.fullmatch(str(version or "")):
        raise ConfigError(
            "nvidia_driver_version",
            f"must be a branch such as '580' (its newest, then held) or an "
            f"exact version such as '580.173.02', got {version!r}",
            host=host_name,
        )


def debian_nonfree_lines(mirror, security_mirror, codename):
    components = "contrib non-free non-free-firmware"
    return [
        f"deb {mirror} {codename} {components}",
        f"deb {mirror} {codename}-updates {components}",
        f"deb {security_mirror} {codename}-security {components}",
    ]


def _proxmox_major():
    """The Proxmox VE major release of this host (its headers package is named after it), or None."""
    if "proxmox_hosts" not in host.groups:
        return None
    return ((host.get_fact(PveVersion) or {}).get("release") or (8, 0))[0]


@until_changed
def host_plan(source, requested, kernel_module=True, open_modules=False):
    """The driver plan for this host, from what apt offers here now (``driver_plan.plan``); worked
    out again only once an operation changed the host (``host_memo``)."""
    distro = host_memo.fact(LinuxDistribution)["name"]
    kernel = host_memo.fact(KernelHeaders)["kernel"]
    meta = image_meta(host.get_fact(KernelImages)) if distro == "Ubuntu" else None
    nvswitch = any(d["kind"] == "nvswitch" for d in host_memo.fact(NvidiaPciDevices))
    proxmox = _proxmox_major()
    kernels = sorted(release for release, found in host_memo.fact(InstalledKernels).items() if found["image"])
    names = driver_plan.relevant_packages(
        source, distro, driver_plan.branch_of(requested), kernel, meta, open_modules, proxmox, kernels
    )
    apt_knows = host.get_fact(AptPackages, packages=names)
    installed = host_memo.fact(DebPackages)
    result = driver_plan.plan(
        source,
        distro,
        requested,
        kernel,
        meta,
        apt_knows,
        installed,
        open_modules,
        nvswitch,
        kernel_module,
        proxmox,
        kernels,
    )
    if proxmox and host.data.get("proxmox_kernel_headers"):
        result.headers = host.data.proxmox_kernel_headers
    result.apt = {name: apt_knows.get(name) for name in names}
    return result


def _plan_in_operation(source, requested, kernel_module=True, open_modules=False):
    """The plan inside an operation: when it runs, a PlanError fails the host naming the setting; when
    the deploy is being planned (before the driver's apt sources may exist), None."""
    try:
        return host_plan(source, requested, kernel_module, open_modules)
    except driver_plan.PlanError as error:
        if host.state.is_executing:
            raise OperationError(f"{host.name}: {error.field}: {error}") from None
        return None


def _anchor_name(source, requested, kernel_module=True):
    """The package this host's driver version is read from (``driver_plan.anchor``: nvidia-smi, ...)."""
    distro = host_memo.fact(LinuxDistribution)["name"]
    return driver_plan.anchor(source, distro, driver_plan.branch_of(requested), kernel_module)


def _anchor_known(source, requested, kernel_module):
    """True when apt offers (or the host has) any version of the package the driver's version is read from."""
    name = _anchor_name(source, requested, kernel_module)
    info = host.get_fact(AptPackages, packages=[name]).get(name)
    return bool(info and (info["versions"] or info["installed"]))


def _source_in_place(source):
    """True when the driver's apt source needs nothing from this run (Ubuntu's own archive, or the
    source's list already on the host): what apt offers now is what the operations will see."""
    if source == "bundle":
        return False  # the bundle's repository is staged by this run, perhaps a newer one
    if source == "distro" and host_memo.fact(LinuxDistribution)["name"] == "Ubuntu":
        return True
    return bool(host.get_fact(File, path=SOURCE_LISTS[source]))


def _plan_or_refuse(source, requested, kernel_module, open_modules):
    """The plan when apt can tell it now; a PlanError it can already tell is refused before any host
    changes. When apt does not know the driver's packages yet (their source is added by this run),
    None: the operations plan again once the source is there."""
    try:
        return host_plan(source, requested, kernel_module, open_modules)
    except driver_plan.PlanError as error:
        if error.field == "nvidia_driver_version" and source == "bundle" and _bundle_offers(requested, kernel_module):
            return None  # the bundle staged by this run has it: the operations plan once it is there
        if (
            error.field != "nvidia_driver_version"
            or _source_in_place(source)
            or _anchor_known(source, requested, kernel_module)
        ):
            raise ConfigError(error.field, str(error), host=host.name) from None
        return None


def _bundle_offers(requested, kernel_module):
    name = _anchor_name("bundle", requested, kernel_module)
    return offline.offers(host.data.get("gpufleet_bundle"), name, requested)


def installed_version(source=None, requested=None, kernel_module=True):
    """The upstream version of the installed driver (its anchor package), or None."""
    source = source or host.data.nvidia_driver_source
    requested = requested or host.data.nvidia_driver_version
    name = _anchor_name(source, requested, kernel_module)
    versions = host_memo.fact(DebPackages).get(name) or []
    return upstream(sorted(versions)[0]) if versions else None


def upgrade_from(source=None, requested=None, kernel_module=True):
    """
    ``(installed, wanted)`` when ``upgrade.py`` moves the installed driver: an exact pin it is not,
    or, for a branch pin, the branch's newest point release that apt offers when the host has an older
    one (``deploy.py`` keeps the point release a host has; only a rollout moves it). None when there
    is nothing to move, or no driver is installed.
    """
    source = source or host.data.nvidia_driver_source
    requested = requested or host.data.nvidia_driver_version
    installed = installed_version(source, requested, kernel_module)
    if installed is None:
        return None
    try:
        plan = host_plan(source, requested, kernel_module, host.data.nvidia_driver_open)
    except driver_plan.PlanError:
        wanted = requested  # apt does not offer it yet (a bundle staged by this run)
    else:
        wanted = plan.version
        if not driver_plan.EXACT.fullmatch(requested):
            anchor_name = _anchor_name(source, requested, kernel_module)
            wanted = driver_plan.newest_of_branch(requested, anchor_name, plan.apt) or wanted
    if installed == wanted or ("." not in wanted and installed.split(".")[0] == wanted):
        return None
    return installed, wanted


@operation()
def kernel_headers(source: str, requested: str, open_modules: bool = False, gpus: int = 0):
    """
    Install the running kernel's headers when DKMS will build the NVIDIA module (before the DKMS
    package, whose installation builds it), and the headers meta packages of the installed kernels'
    flavours, so that the headers of every kernel apt installs later come with it and DKMS builds its
    module before the host boots it. Without a headers package for the running kernel: a host with a
    GPU is refused (the module cannot be built); one without is told and left alone.
    """
    plan = _plan_in_operation(source, requested, True, open_modules)
    if plan is None:
        yield "true  # the kernel headers DKMS needs are decided once the driver's apt sources are in place"
        return
    if not plan.dkms:
        host.noop(f"no DKMS: {plan.notes[-1]}")
        return
    metas = [name for name in plan.header_metas if not (plan.apt.get(name) or {}).get("installed")]
    wanted = [name for name in (_running_kernel_headers(plan, gpus), *metas) if name]
    if wanted:
        yield f"{apt_pin.APT_INSTALL} {' '.join(shlex.quote(name) for name in wanted)}"
    if plan.header_metas and not metas:
        host.noop(f"the next kernels' headers come with {', '.join(plan.header_metas)} (installed)")


def _running_kernel_headers(plan, gpus):
    """The running kernel's headers package when it is to be installed; None when it is there (or, on a
    host without a GPU, when apt has none: said). A GPU host without any is refused."""
    kernel = host_memo.fact(KernelHeaders)
    # What apt said of the headers when the plan was made (it asks about them), unless the plan named others.
    known = (
        plan.apt[plan.headers]
        if plan.headers in plan.apt
        else host.get_fact(AptPackages, packages=[plan.headers]).get(plan.headers)
    )
    if known and known["installed"]:
        host.noop(f"{plan.headers} installed")
        return None
    if known and known["candidate"]:
        return plan.headers
    if kernel["headers"]:
        host.noop(
            f"no {plan.headers} package; headers for {kernel['kernel']} are at /lib/modules/{kernel['kernel']}/build"
        )
        return None
    if gpus:
        raise OperationError(
            f"{host.name}: DKMS builds the NVIDIA module against the running kernel "
            f"{kernel['kernel']}'s headers, and the host's apt sources have no {plan.headers} "
            f"(nor is /lib/modules/{kernel['kernel']}/build there). Install them, or boot a "
            "kernel of the distribution; nothing of the driver was installed"
        )
    logger.warning(
        f"[{host.name}] no {plan.headers} in the host's apt sources for the running kernel "
        f"{kernel['kernel']}: DKMS cannot build the NVIDIA module for it (no GPU here: skipped)"
    )
    host.noop(f"no headers for {kernel['kernel']}")
    return None


@operation()
def driver_installed(
    source: str, requested: str, pin_name: str, kernel_module: bool = True, open_modules: bool = False
):
    """
    Install the plan's packages at its version and hold them, its precompiled module packages (never
    held: kernel upgrades bring theirs), and remove what a former plan installed instead.
    """
    plan = _plan_in_operation(source, requested, kernel_module, open_modules)
    if plan is None:
        yield "true  # the driver's packages are decided once its apt sources are in place"
        return
    for note in plan.notes:
        host.log(note)
    yield from apt_pin.installed._inner(
        packages=plan.packages,
        version=plan.version,
        pin_name=pin_name,
        pin_patterns=PIN_PATTERNS,
        unversioned=plan.modules,
        remove=plan.remove,
    )


@operation()
def module_built(
    source: str,
    requested: str,
    open_modules: bool = False,
    gpus: int = 0,
    log_glob: str = "/var/lib/dkms/*/{version}/build/make.log",
):
    """
    The NVIDIA module of the driver's version exists (``modinfo -k``) for the running kernel and for
    the kernel the host boots next (its newest kernel image): a DKMS module not built yet is built
    (``dkms autoinstall``); one that cannot be is an error naming the kernel and the DKMS build log.
    A kernel without headers to build against: refused for the next boot of a GPU host (it would come
    up without its GPUs), otherwise skipped and said.
    """
    plan = _plan_in_operation(source, requested, True, open_modules)
    if plan is None:
        yield "true  # checked once the driver is installed"
        return
    running = host_memo.fact(KernelHeaders)
    kernels = host_memo.fact(InstalledKernels)
    upcoming = next_boot(kernels, running["kernel"])
    checks = [(running["kernel"], running["headers"], RUNNING)]
    if upcoming != running["kernel"]:
        checks.append((upcoming, kernels[upcoming]["headers"], BOOTS_NEXT))
    for kernel, headers, which in checks:
        command = _module_check(plan, kernel, headers, which, gpus, log_glob)
        if command:
            yield command


def _name_a_kernel_without_its_module(plan, kernel, gpus):
    """Ubuntu: the kernel the host boots next has no precompiled module at the pinned version. Named
    before any reboot with the ways out; a GPU host is refused (it would boot without its GPUs)."""
    why = plan.unmodulated.get(kernel) or "its precompiled module package is not installed"
    message = (
        f"the kernel this host boots next, {kernel}, has no NVIDIA module {plan.version}: {why}. Before "
        "rebooting, choose: roll the driver to a point release Canonical built that kernel's module for "
        "(upgrade.py, nvidia_driver_version as a branch); build the module with DKMS (nvidia-dkms and that "
        "kernel's headers); or hold the kernel meta package (apt-mark hold) until its module is published"
    )
    if gpus:
        raise OperationError(f"{host.name}: {message}")
    logger.warning(f"[{host.name}] {message} (no GPU here: nothing is lost on reboot)")
    host.noop(f"the kernel this host boots next, {kernel}, has no precompiled NVIDIA module {plan.version}")


def _module_check(plan, kernel, headers, which, gpus, log_glob):
    """The command that builds and checks ``kernel``'s module, or None when it is there (or cannot be
    built on a host without a GPU: said); a module that cannot be there is an error."""
    found = host.get_fact(NvidiaModuleFor, kernel=kernel)
    if found and found["version"] == plan.version:
        host.noop(f"{found['module']} {found['version']} for {which} {kernel} ({found['filename']})")
        return None
    if not plan.dkms:
        if which == RUNNING:
            raise OperationError(
                f"{host.name}: no NVIDIA module {plan.version} for the running kernel "
                f"{kernel} after installing {', '.join(plan.modules)} (modinfo says: "
                f"{found['version'] if found else 'none'})"
            )
        _name_a_kernel_without_its_module(plan, kernel, gpus)
        return None
    if not headers:
        if gpus and which == BOOTS_NEXT:
            bringer = ", ".join(plan.header_metas) or f"the linux-headers package of {kernel}"
            raise OperationError(
                f"{host.name}: {which}, {kernel}, has no NVIDIA module {plan.version} and no headers to build "
                f"one: it would boot without its GPUs. Install its headers ({bringer} brings them for the "
                "kernels apt installs), or remove that kernel image; then run again"
            )
        host.noop(f"no headers for {which} {kernel}: the module is not built here")
        return None
    return (
        f"sh -c {shlex.quote(MODULE_CHECK)} gpufleet-module-check {shlex.quote(kernel)} "
        f"{shlex.quote(plan.version)} {shlex.quote(log_glob.format(version=plan.version))} {shlex.quote(which)}"
    )


@deploy("Install NVIDIA driver", data_defaults=settings.DEFAULTS)
def install_driver(
    source: str | None = None,
    version: str | None = None,
    reboot: bool | None = None,
    kernel_module: bool = True,
    open_modules: bool | None = None,
):
    """
    Install the pinned NVIDIA driver, hold it, blacklist nouveau, and reboot only if needed and allowed.

    + source: ``distro`` (Debian non-free, Ubuntu's server drivers), ``cuda-repo``, ``local-repo``
      or ``bundle`` (the offline bundle staged by ``from_bundle.stage_packages``)
    + version: a branch (``580``: its newest, then held) or an exact version (``nvidia_driver_version``)
    + reboot: allow a reboot when the driver or blacklist changed on a GPU host (``nvidia_driver_reboot``)
    + kernel_module: False for an LXC guest: user-space libraries only (its Proxmox host loads the
      module), no nouveau blacklist, headers, persistence daemon or reboot
    + open_modules: NVIDIA's open kernel modules (``nvidia_driver_open``; Turing and later, and the
      only ones Blackwell runs)

    Returns the package operation, so later steps can react to a driver change.
    """
    source = source or host.data.nvidia_driver_source
    version = version or host.data.nvidia_driver_version
    reboot = host.data.nvidia_driver_reboot if reboot is None else reboot
    open_modules = host.data.nvidia_driver_open if open_modules is None else open_modules
    distro = host_memo.fact(LinuxDistribution)
    gpus = devices.gpus()
    nvswitch = any(d["kind"] == "nvswitch" for d in host_memo.fact(NvidiaPciDevices))

    if kernel_module:
        _refuse_unfit_modules(source, distro, gpus, open_modules, nvswitch)
    plan = _plan_or_refuse(source, version, kernel_module, open_modules)
    if kernel_module:
        _refuse_unsigned_module_under_secure_boot(source, distro, plan)
    if plan:
        logger.info(
            f"[{host.name}] NVIDIA driver {plan.version} ({version} pinned): "
            f"{'; '.join(plan.notes) or 'user space only'}"
        )

    _apt_source(source, distro)
    driver = _packages(source, version, kernel_module, open_modules, gpus)
    if not kernel_module:
        return driver
    module_built(
        name="Check the NVIDIA module is built for the running kernel and the one it boots next",
        source=source,
        requested=version,
        open_modules=open_modules,
        gpus=len(gpus),
    )
    blacklist = _nouveau_blacklisted()
    dropin = _persistenced_dropin(distro)
    if gpus:
        _persistence_daemon(source, distro, dropin)
        if nvswitch:
            _fabric_manager(driver)
        _reboot_when_needed(plan.version if plan else version, reboot, driver, blacklist)
    return driver


def _refuse_unfit_modules(source, distro, gpus, open_modules, nvswitch):
    """Refuse, before any host changes, kernel modules that cannot drive these GPUs (open or proprietary),
    and an NVSwitch host on Debian's archive, which has no Fabric Manager."""
    try:
        driver_plan.check_kernel_module_kind(gpus, open_modules)
    except driver_plan.PlanError as error:
        raise ConfigError(error.field, str(error), host=host.name) from None
    if nvswitch and distro["name"] == "Debian" and source not in ("cuda-repo",):
        raise ConfigError(
            "nvidia_driver_source",
            "this host has NVSwitches, which need NVIDIA Fabric Manager "
            "at the driver's version, and Debian's archive has none: use nvidia_driver_source = "
            "'cuda-repo'",
            host=host.name,
        )


def _refuse_unsigned_module_under_secure_boot(source, distro, plan):
    """Refuse a DKMS-built (unsigned) module on a host whose Secure Boot would not load it."""
    dkms = plan.dkms if plan else (distro["name"] != "Ubuntu" or source == "cuda-repo")
    if dkms and host.get_fact(SecureBoot) and not host.data.nvidia_driver_secure_boot_signed:
        raise HostStateError(
            f"{host.name}: Secure Boot is on and the {source} driver's module is built by DKMS, unsigned, for "
            f"{host_memo.fact(KernelHeaders)['kernel']}: the kernel would refuse to load it. Enrol a MOK and let "
            "DKMS sign with it (mokutil --import /var/lib/dkms/mok.pub, reboot, confirm), then set "
            "nvidia_driver_secure_boot_signed = True; or, on Ubuntu, run a kernel Canonical ships signed "
            "precompiled NVIDIA modules for. Nothing was changed."
        )


def _apt_source(source, distro):
    """The driver's apt source (none for the bundle, staged already, or Ubuntu, whose restricted
    component is in its default sources), apt's lists updated when it changed."""
    codename = (distro["release_meta"].get("VERSION_CODENAME") or "").lower()
    if source == "local-repo":
        repo = files.line(
            name="Add the local driver repository",
            path=SOURCE_LISTS["local-repo"],
            line=apt_sources.local_line(host.data.nvidia_driver_local_repo),
        )
    elif source == "cuda-repo":
        url = host.data.nvidia_driver_cuda_repo_url or CUDA_REPO_URL.format(
            distro=distro["name"].lower(), release=distro["release_meta"].get("VERSION_ID", "").replace(".", "")
        )
        files.download(
            name="Download NVIDIA's CUDA repository key", src=f"{url}3bf863cc.pub", dest=CUDA_KEYRING, mode="644"
        )
        repo = files.line(
            name="Add NVIDIA's CUDA repository",
            path=SOURCE_LISTS["cuda-repo"],
            line=apt_sources.signed_line(CUDA_KEYRING, url),
        )
    elif source == "distro" and distro["name"] == "Debian":
        repo = files.put(
            name="Enable Debian's contrib, non-free and non-free-firmware",
            src=StringIO(
                "\n".join(
                    debian_nonfree_lines(
                        host.data.nvidia_driver_debian_mirror, host.data.nvidia_driver_debian_security_mirror, codename
                    )
                )
                + "\n"
            ),
            dest=SOURCE_LISTS["distro"],
            mode="644",
            create_remote_dir=False,
        )
    else:
        return
    apt_sources.update_after("driver", [repo])


def _packages(source, version, kernel_module, open_modules, gpus):
    """The running kernel's headers where DKMS builds the module, the driver's packages held at their
    version, and NVIDIA's packages kept out of unattended upgrades. Returns the package operation."""
    what = "NVIDIA driver" if kernel_module else "NVIDIA user-space driver (no kernel module)"
    if kernel_module:
        kernel_headers(
            name="Install the running kernel's headers for DKMS",
            source=source,
            requested=version,
            open_modules=open_modules,
            gpus=len(gpus),
        )
    driver = driver_installed(
        name=f"Install {what} {version} and hold it",
        source=source,
        requested=version,
        pin_name="gpufleet-nvidia-driver",
        kernel_module=kernel_module,
        open_modules=open_modules,
    )
    files.put(
        name="Keep NVIDIA packages out of unattended upgrades",
        src=StringIO(
            'Unattended-Upgrade::Package-Blacklist {\n    "nvidia-";\n    "libnvidia-";\n'
            '    "libcuda";\n    "cuda-drivers";\n};\n'
        ),
        dest=UNATTENDED_BLACKLIST,
        mode="644",
        create_remote_dir=False,
    )
    return driver


def _nouveau_blacklisted():
    """nouveau blacklisted, and the initramfs rebuilt without it when that changed."""
    blacklist = files.put(
        name="Blacklist nouveau",
        src=StringIO("blacklist nouveau\noptions nouveau modeset=0\n"),
        dest=NOUVEAU_BLACKLIST,
        mode="644",
    )
    server.shell(
        name="Rebuild the initramfs without nouveau",
        _if=blacklist.did_change,
        commands=[
            "if command -v update-initramfs >/dev/null; then update-initramfs -u; "
            "else echo 'no initramfs-tools on this host: nothing to rebuild'; fi"
        ],
    )
    return blacklist


def _persistenced_dropin(distro):
    """nvidia-persistenced's drop-in: persistence mode, as the user its distro's package made."""
    user = host.get_fact(PersistencedUser) or PERSISTENCED_USERS.get(distro["name"], "nvidia-persistenced")
    dropin = files.put(
        name="Run nvidia-persistenced in persistence mode",
        src=StringIO(
            "[Service]\nExecStart=\nExecStart=/usr/bin/nvidia-persistenced "
            f"--user {user} --persistence-mode --verbose\n"
        ),
        dest=PERSISTENCED_DROPIN,
        mode="644",
    )
    systemd.daemon_reload(name="Reload systemd after the persistenced drop-in changed", _if=dropin.did_change)
    return dropin


def _persistence_daemon(source, distro, dropin):
    """nvidia-persistenced installed (Debian ships it apart), restarted after its drop-in changed, running."""
    if distro["name"] == "Debian" and source != "cuda-repo":
        apt.packages(name="Install nvidia-persistenced", packages=["nvidia-persistenced"], no_recommends=True)
    systemd.service(
        name="Restart nvidia-persistenced after its drop-in changed",
        service="nvidia-persistenced",
        restarted=True,
        _if=dropin.did_change,
    )
    systemd.service(name="Enable nvidia-persistenced", service="nvidia-persistenced", running=True, enabled=True)


def _fabric_manager(driver):
    """NVIDIA Fabric Manager (NVSwitch systems): restarted after the driver changed, running."""
    systemd.service(
        name="Restart NVIDIA Fabric Manager after the driver changed",
        service="nvidia-fabricmanager",
        restarted=True,
        _if=driver.did_change,
    )
    systemd.service(
        name="Run NVIDIA Fabric Manager (NVSwitch)", service="nvidia-fabricmanager", running=True, enabled=True
    )


def _reboot_when_needed(wanted, reboot, driver, blacklist):
    """Reboot to load the driver when its module is stale or it (or the blacklist) changed, if allowed
    (never the control node); otherwise say that a reboot is needed."""
    loaded = host.get_fact(NvidiaKernelModule)
    stale = loaded is not None and loaded["version"] != wanted
    why = f"loaded module {loaded['version']} is not {wanted}" if stale else "driver or nouveau blacklist changed"
    if reboot and host.connector_cls.__name__ != "LocalConnector":
        server.reboot(
            name=f"Reboot to load NVIDIA driver {wanted} ({why})",
            reboot_timeout=host.data.nvidia_driver_reboot_timeout,
            _if=reboot_needed(stale, driver, blacklist),
        )
    elif stale or driver.will_change or blacklist.will_change:  # a message, not an operation: said up front
        logger.warning(
            f"[{host.name}] reboot needed to load NVIDIA driver {wanted} ({why}); "
            "not rebooting: set nvidia_driver_reboot = True to allow it"
        )


def reboot_needed(stale, driver, blacklist):
    """The condition pyinfra checks (``_if``) once the driver's operations ran: reboot when the loaded
    module was not the wanted one, or the driver's packages or the nouveau blacklist changed."""

    def needed():
        return stale or driver.did_change() or blacklist.did_change()

    return needed
