"""NVIDIA Container Toolkit: the four packages at one version, then ``nvidia-ctk runtime configure``
only when the engine lacks the runtime (the engine restart is left to the caller's handler), the
/dev/char links runc needs under systemd cgroups, and a GPU container run to prove it works."""

import os
import shlex
import tomllib
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FactBase, OperationError, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import File
from pyinfra.operations import files

from operations import TEMPLATES
from operations.container import docker
from operations.container.containerd import ContainerdRuntimes
from operations.core import apt_pin, apt_sources, host_memo, json_files, settings
from operations.core.errors import ConfigError
from operations.driver.devices import DevCharLinks, NvidiaDeviceNodes, linked_by_nvidia_ctk, missing_dev_char_links
from operations.offline import bundle

PACKAGES = [
    "libnvidia-container1",
    "libnvidia-container-tools",
    "nvidia-container-toolkit-base",
    "nvidia-container-toolkit",
]
CDI_SPEC = "/etc/cdi/nvidia.yaml"
NVIDIA_REPO = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)"
NVIDIA_KEY_URL = "https://nvidia.github.io/libnvidia-container/gpgkey"
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.asc"  # apt reads armored .asc keys
RUNTIME_BINARY = "nvidia-container-runtime"
RUNTIME_CONFIG = "/etc/nvidia-container-runtime/config.toml"
DEV_CHAR_RULE = "/lib/udev/rules.d/71-nvidia-dev-char.rules"


def check_runtime(data, host_name):
    engine = data.get("nvidia_toolkit_engine", "docker")
    if engine != "docker" and data.get("inference_services"):
        raise ConfigError(
            "nvidia_toolkit_engine",
            f"is {engine!r}, but the inference services run as Docker "
            "containers: use 'docker' on hosts with inference_services",
            host=host_name,
        )


def has_nvidia_runtime(daemon):
    """True when daemon.json already names nvidia-container-runtime (bare name or absolute path)."""
    runtime = ((daemon or {}).get("runtimes") or {}).get("nvidia") or {}
    return os.path.basename(str(runtime.get("path", ""))) == RUNTIME_BINARY


def configure_command(set_as_default=False, engine="docker"):
    return f"nvidia-ctk runtime configure --runtime={engine}" + (" --set-as-default" if set_as_default else "")


class NoCgroups(FactBase):
    """Returns True when config.toml's [nvidia-container-cli] section sets ``no-cgroups = true``."""

    def command(self):
        return f"cat {RUNTIME_CONFIG} 2>/dev/null; true"

    def process(self, output):
        try:
            config = tomllib.loads("\n".join(output))
        except tomllib.TOMLDecodeError:
            return False  # not set as far as anyone can read: nvidia-ctk config names the file's fault
        return config.get("nvidia-container-cli", {}).get("no-cgroups") is True


def upgrade_from(version=None):
    """``(installed, pinned)`` when the installed toolkit is not the pinned version; None when it is,
    or when none is installed."""
    version = version or host.data.nvidia_toolkit_version
    installed = host_memo.fact(DebPackages).get("nvidia-container-toolkit") or []
    if not installed or apt_pin.matches(installed, version):
        return None
    return sorted(installed)[0].split(":", 1)[-1].rsplit("-", 1)[0], version


@deploy("Install NVIDIA Container Toolkit", data_defaults=settings.DEFAULTS)
def install_toolkit(
    version: str | None = None,
    source: str | None = None,
    engine: str | None = None,
    set_as_default: bool | None = None,
    no_cgroups: bool = False,
    dev_char_symlinks: bool | None = None,
    gpus: int = 0,
    driver: OperationMeta | None = None,
):
    """
    Install the toolkit's four packages at one pinned version and wire the engine to it.

    + version: toolkit version (``nvidia_toolkit_version``), packages at ``<version>-1``
    + source: ``nvidia-repo`` (NVIDIA's apt repository), ``local-repo`` (staged on the host) or
      ``bundle`` (the offline bundle's repository)
    + engine: ``docker`` or ``containerd`` (the nvidia runtime in its config), or ``podman`` (a CDI
      spec, generated only on a host with GPUs) (``nvidia_toolkit_engine``)
    + set_as_default: make nvidia the engine's default runtime (``nvidia_toolkit_set_as_default``)
    + no_cgroups: leave device cgroups to the host (an unprivileged LXC guest, where the hook cannot
      write them): ``no-cgroups = true`` in config.toml
    + dev_char_symlinks: keep /dev/char links to the GPU device nodes, now and whenever the driver
      binds (``nvidia_toolkit_dev_char_symlinks``; off for an LXC guest, whose nodes its host makes)
    + gpus: how many GPUs the host has; without any, no CDI spec can be generated
    + driver: the driver's package operation: when it changed, the CDI spec (which names the
      driver's libraries) is generated again

    Returns the engine's configuration operation (pass it to the engine's ``restart_on_change``;
    None for Podman without GPUs) and the packages operation.
    """
    version = version or host.data.nvidia_toolkit_version
    source = source or host.data.nvidia_toolkit_source
    engine = engine or host.data.nvidia_toolkit_engine
    set_as_default = host.data.nvidia_toolkit_set_as_default if set_as_default is None else set_as_default
    if dev_char_symlinks is None:
        dev_char_symlinks = host.data.nvidia_toolkit_dev_char_symlinks

    _apt_source(source)
    packages = apt_pin.installed(
        name=f"Install NVIDIA Container Toolkit {version} and hold it",
        packages=PACKAGES,
        version=version,
        pin_name="gpufleet-nvidia-toolkit",
        pin_patterns=PACKAGES,
    )

    if no_cgroups:
        cgroups_off(name="Leave device cgroups to the LXC host (nvidia-container-cli no-cgroups)")
    if dev_char_symlinks:
        files.put(
            name="Link NVIDIA device nodes into /dev/char whenever the driver binds (udev rule)",
            src=str(TEMPLATES / "71-nvidia-dev-char.rules"),
            dest=DEV_CHAR_RULE,
            mode="644",
        )
        dev_char_links(name="Link the NVIDIA device nodes into /dev/char now")

    if engine == "docker":
        runtime = docker_runtime(
            name="Configure Docker's nvidia runtime (nvidia-ctk runtime configure)", set_as_default=set_as_default
        )
    elif engine == "containerd":
        runtime = containerd_runtime(
            name="Configure containerd's nvidia runtime (nvidia-ctk runtime configure)", set_as_default=set_as_default
        )
    else:
        runtime = None
        if gpus:
            runtime = cdi_spec(name=f"Generate the CDI specification {CDI_SPEC} (nvidia-ctk cdi generate)")
            if driver is not None:  # the spec lists the driver's libraries
                cdi_spec(name=f"Regenerate {CDI_SPEC} after the driver changed", regenerate=True, _if=driver.did_change)
    return runtime, packages


def _apt_source(source):
    """The toolkit's apt source (none for the bundle, staged already), apt's lists updated when it changed."""
    if source == "bundle":
        return  # from_bundle.stage_packages staged the repository and updated apt's lists
    if source == "local-repo":
        repo_dir = host.data.nvidia_toolkit_local_repo
        staged = (
            files.sync(
                name="Stage the toolkit repository",
                src=host.data.nvidia_toolkit_local_repo_src,
                dest=repo_dir,
                delete=True,
            )
            if host.data.nvidia_toolkit_local_repo_src
            else None
        )
        repo = files.put(
            name="Add the local toolkit repository",
            src=StringIO(apt_sources.local_line(repo_dir) + "\n"),
            dest="/etc/apt/sources.list.d/gpufleet-toolkit-local.list",
            mode="644",
            create_remote_dir=False,
        )
        changed = [op for op in (staged, repo) if op is not None]
    else:
        key = files.download(
            name="Download NVIDIA's toolkit repository key", src=NVIDIA_KEY_URL, dest=KEYRING, mode="644"
        )
        repo = files.put(
            name="Add NVIDIA's toolkit repository",
            src=StringIO(apt_sources.signed_line(KEYRING, NVIDIA_REPO) + "\n"),
            dest="/etc/apt/sources.list.d/nvidia-container-toolkit.list",
            mode="644",
            create_remote_dir=False,
        )
        changed = [key, repo]
    apt_sources.update_after("toolkit", changed)


@operation()
def docker_runtime(set_as_default: bool = False):
    """
    Run ``nvidia-ctk runtime configure --runtime=docker`` only when daemon.json lacks the runtime.

    + set_as_default: also make nvidia the default runtime

    The Docker restart that makes it take effect belongs to ``docker.restart_on_change``.
    """
    daemon = json_files.read(docker.DAEMON_JSON)
    default_ok = not set_as_default or (daemon or {}).get("default-runtime") == "nvidia"
    if has_nvidia_runtime(daemon) and default_ok:
        host.noop(f"{docker.DAEMON_JSON} already has the nvidia runtime")
        return
    yield configure_command(set_as_default)


@operation()
def containerd_runtime(set_as_default: bool = False):
    """
    Run ``nvidia-ctk runtime configure --runtime=containerd`` only when no containerd config file
    (config.toml or a conf.d drop-in) has the nvidia runtime.

    + set_as_default: also make nvidia the CRI plugin's default runtime
    """
    found = host.get_fact(ContainerdRuntimes)
    if "__invalid__" in found:
        raise OperationError(f"{host.name}: {found['__invalid__']}; fix or remove it, gpufleet left it as it is")
    present = os.path.basename(found["runtimes"].get("nvidia") or "") == RUNTIME_BINARY
    if present and (not set_as_default or found["default"] == "nvidia"):
        host.noop("containerd already has the nvidia runtime")
        return
    yield configure_command(set_as_default, engine="containerd")


@operation()
def cdi_spec(regenerate: bool = False):
    """
    Write the CDI specification of this host's GPUs with ``nvidia-ctk cdi generate`` when it is
    missing, or when ``regenerate`` (the driver, whose libraries it lists, changed).
    """
    if host.get_fact(File, path=CDI_SPEC) and not regenerate:
        host.noop(f"{CDI_SPEC} exists")
        return
    yield f"nvidia-ctk cdi generate --output={CDI_SPEC}"


@operation()
def cgroups_off():
    """Set ``no-cgroups = true`` with ``nvidia-ctk config --in-place`` unless it is already set."""
    if host.get_fact(NoCgroups):
        host.noop(f"{RUNTIME_CONFIG} already has no-cgroups = true")
        return
    yield "nvidia-ctk config --in-place --set nvidia-container-cli.no-cgroups"


@operation()
def dev_char_links():
    """Run ``nvidia-ctk system create-dev-char-symlinks --create-all`` when a node it links lacks its
    link (an NVSwitch's, NVLink's or GPUDirect Storage's node never gets one)."""
    nodes = linked_by_nvidia_ctk(host.get_fact(NvidiaDeviceNodes))
    missing = missing_dev_char_links(nodes, host.get_fact(DevCharLinks))
    if not missing:
        host.noop(f"/dev/char links all {len(nodes)} NVIDIA device nodes" if nodes else "no NVIDIA device nodes")
        return
    yield "nvidia-ctk system create-dev-char-symlinks --create-all"


def check_command(image, offline=False, engine="docker"):
    """Run nvidia-smi in ``image`` with every GPU (Docker's --gpus, or Podman's CDI devices); an
    offline host never pulls."""
    gpus = "--device nvidia.com/gpu=all" if engine == "podman" else "--gpus all"
    return (
        f"{engine} run --rm --pull {'never' if offline else 'missing'} {gpus} {shlex.quote(image)} "
        "nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader"
    )


@operation(is_idempotent=False)
def gpu_container_run(image: str, offline: bool = False, engine: str = "docker"):
    """
    Prove the toolkit hands GPUs to containers: run nvidia-smi in ``image`` with every GPU.

    + image: a pinned CUDA base image (offline hosts: loaded from the bundle beforehand)
    + offline: never pull the image
    + engine: ``docker`` or ``podman``
    """
    yield check_command(image, offline, engine)


@deploy("Check GPUs in a container", data_defaults=settings.DEFAULTS)
def check_gpu_container(after: list[OperationMeta], image: str | None = None, engine: str | None = None):
    """
    Run a CUDA container with every GPU when ``after`` (driver, toolkit, engine operations) changed.

    + after: the operations whose change calls for the check; a converged host runs nothing
    + image: the CUDA base image (``nvidia_toolkit_check_image``)
    + engine: ``docker`` or ``podman``; containerd serves Kubernetes, whose own GPU pod checks it
    """
    image = image or host.data.nvidia_toolkit_check_image
    engine = engine or host.data.nvidia_toolkit_engine
    offline = bool(host.data.get("gpufleet_offline"))
    if engine == "containerd":
        logger.warning(f"[{host.name}] containerd: gpufleet runs no GPU container here; check with a GPU pod")
        return
    if offline:
        require_bundled(image, bundle.load(host.data.gpufleet_bundle), host.name)
    gpu_container_run(
        name=f"Run nvidia-smi in {image} with every GPU ({engine})",
        image=image,
        offline=offline,
        engine=engine,
        _if=lambda: any(op.did_change() for op in after),
    )


def require_bundled(image, manifest, host_name=None):
    """An offline host cannot pull: refuse, before any host changes, a check image the bundle lacks."""
    if image not in {entry["name"] for entry in manifest.get("images", [])}:
        raise ConfigError(
            "nvidia_toolkit_check_image",
            f"{image} is not among the bundle's images, and this "
            "offline GPU host cannot pull it: add it to the bundle's images",
            host=host_name,
        )
