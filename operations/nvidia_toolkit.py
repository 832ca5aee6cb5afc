"""NVIDIA Container Toolkit: the four packages at one version, then ``nvidia-ctk runtime configure``
only when the engine lacks the runtime; the engine restart is left to the caller's handler."""

import os
from io import StringIO

import re

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.operations import apt, files

from . import apt_pin, config, docker_engine, json_ops

PACKAGES = ["libnvidia-container1", "libnvidia-container-tools",
            "nvidia-container-toolkit-base", "nvidia-container-toolkit"]
SOURCES = ("nvidia-repo", "local-repo", "bundle")
ENGINES = ("docker",)
NVIDIA_REPO = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)"
NVIDIA_KEY_URL = "https://nvidia.github.io/libnvidia-container/gpgkey"
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.asc"  # apt reads armored .asc keys
RUNTIME_BINARY = "nvidia-container-runtime"
RUNTIME_CONFIG = "/etc/nvidia-container-runtime/config.toml"

DEFAULTS = {
    "nvidia_toolkit_version": "1.17.8",
    "nvidia_toolkit_source": "nvidia-repo",
    "nvidia_toolkit_local_repo": "/var/lib/gpufleet/toolkit-repo",
    "nvidia_toolkit_local_repo_src": None,
    "nvidia_toolkit_engine": "docker",
    "nvidia_toolkit_set_as_default": False,
}

config.register({
    "nvidia_toolkit_version": (lambda v: isinstance(v, str) and v.count(".") == 2 and v != "latest",
                               "a pinned version such as '1.17.8'"),
    "nvidia_toolkit_source": (lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}"),
    "nvidia_toolkit_local_repo": (config._is_str, "a directory on the host for a flat apt repository"),
    "nvidia_toolkit_local_repo_src": (config._is_str, "a directory on the control node to stage from"),
    "nvidia_toolkit_engine": (lambda v: v in ENGINES, f"one of {', '.join(ENGINES)}"),
    "nvidia_toolkit_set_as_default": (config._is_bool, "true or false"),
})


def has_nvidia_runtime(daemon):
    """True when daemon.json already names nvidia-container-runtime (bare name or absolute path)."""
    runtime = ((daemon or {}).get("runtimes") or {}).get("nvidia") or {}
    return os.path.basename(str(runtime.get("path", ""))) == RUNTIME_BINARY


def configure_command(set_as_default=False):
    return "nvidia-ctk runtime configure --runtime=docker" + (" --set-as-default" if set_as_default else "")


class NoCgroups(FactBase):
    """Returns True when config.toml's [nvidia-container-cli] section sets ``no-cgroups = true``."""

    def command(self):
        return f"cat {RUNTIME_CONFIG} 2>/dev/null; true"

    def process(self, output):
        section = None
        for line in output:
            line = line.strip()
            if line.startswith("["):
                section = line.strip("[]")
            elif section == "nvidia-container-cli" and re.fullmatch(r"no-cgroups\s*=\s*true", line):
                return True
        return False


@deploy("Install NVIDIA Container Toolkit", data_defaults=DEFAULTS)
def install_toolkit(version=None, source=None, set_as_default=None, no_cgroups=False):
    """
    Install the toolkit's four packages at one pinned version and configure Docker's runtime.

    + version: toolkit version (``nvidia_toolkit_version``), packages at ``<version>-1``
    + source: ``nvidia-repo`` (NVIDIA's apt repository), ``local-repo`` (staged on the host) or
      ``bundle`` (the offline bundle's repository)
    + set_as_default: make nvidia Docker's default runtime (``nvidia_toolkit_set_as_default``)
    + no_cgroups: leave device cgroups to the host (an unprivileged LXC guest, where the hook cannot
      write them): ``no-cgroups = true`` in config.toml

    Returns the runtime operation: pass it to ``docker_engine.restart_on_change``.
    """
    version = version or host.data.nvidia_toolkit_version
    source = source or host.data.nvidia_toolkit_source
    set_as_default = host.data.nvidia_toolkit_set_as_default if set_as_default is None else set_as_default

    if source == "local-repo":
        repo_dir = host.data.nvidia_toolkit_local_repo
        staged = files.sync(name="Stage the toolkit repository", src=host.data.nvidia_toolkit_local_repo_src,
                            dest=repo_dir, delete=True) if host.data.nvidia_toolkit_local_repo_src else None
        repo = files.put(name="Add the local toolkit repository", src=StringIO(f"deb [trusted=yes] file:{repo_dir} ./\n"),
                         dest="/etc/apt/sources.list.d/gpufleet-toolkit-local.list", mode="644")
        changed = [op for op in (staged, repo) if op is not None]
    elif source == "bundle":
        changed = []  # offline.stage_packages staged the repository and updated apt's lists
    else:
        key = files.download(name="Download NVIDIA's toolkit repository key", src=NVIDIA_KEY_URL,
                             dest=KEYRING, mode="644")
        repo = files.put(name="Add NVIDIA's toolkit repository",
                         src=StringIO(f"deb [signed-by={KEYRING}] {NVIDIA_REPO} /\n"),
                         dest="/etc/apt/sources.list.d/nvidia-container-toolkit.list", mode="644")
        changed = [key, repo]
    if changed:
        apt.update(name="Update apt lists after the toolkit source changed",
                   _if=lambda: any(op.did_change() for op in changed))

    apt_pin.installed(name=f"Install NVIDIA Container Toolkit {version} and hold it", packages=PACKAGES,
                      version=version, pin_name="gpufleet-nvidia-toolkit", pin_patterns=PACKAGES)

    if no_cgroups:
        cgroups_off(name="Leave device cgroups to the LXC host (nvidia-container-cli no-cgroups)")

    return docker_runtime(name="Configure Docker's nvidia runtime (nvidia-ctk runtime configure)",
                          set_as_default=set_as_default)


@operation()
def docker_runtime(set_as_default=False):
    """
    Run ``nvidia-ctk runtime configure --runtime=docker`` only when daemon.json lacks the runtime.

    + set_as_default: also make nvidia the default runtime

    The Docker restart that makes it take effect belongs to ``docker_engine.restart_on_change``.
    """
    daemon = json_ops.read(docker_engine.DAEMON_JSON)
    default_ok = not set_as_default or (daemon or {}).get("default-runtime") == "nvidia"
    if has_nvidia_runtime(daemon) and default_ok:
        host.noop(f"{docker_engine.DAEMON_JSON} already has the nvidia runtime")
        return
    yield configure_command(set_as_default)


@operation()
def cgroups_off():
    """Set ``no-cgroups = true`` with ``nvidia-ctk config --in-place`` unless it is already set."""
    if host.get_fact(NoCgroups):
        host.noop(f"{RUNTIME_CONFIG} already has no-cgroups = true")
        return
    yield "nvidia-ctk config --in-place --set nvidia-container-cli.no-cgroups"
