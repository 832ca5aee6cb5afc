"""Docker engine: distro packages, /etc/docker/daemon.json merged (log rotation, registry
mirrors, live-restore), the service reloaded or restarted for what changed; a site's private
registries (their CA, root-only logins)."""

import os
import stat
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from operations import TEMPLATES, TOOLS_DIR
from operations.container import images as docker_images
from operations.core import json_files, settings
from operations.core.errors import ConfigError
from operations.services import rolling

DAEMON_JSON = "/etc/docker/daemon.json"
CERTS_DIR = "/etc/docker/certs.d"
# The daemon.json keys dockerd applies on SIGHUP (`systemctl reload docker`), without stopping anything:
# moby v20.10.24 daemon/reload.go and reload_unix.go (Debian 12 ships 20.10.24); later releases add keys.
RELOADABLE = {
    "allow-nondistributable-artifacts",
    "cluster-advertise",
    "cluster-store",
    "cluster-store-opts",
    "debug",
    "default-runtime",
    "default-shm-size",
    "features",
    "insecure-registries",
    "labels",
    "live-restore",
    "max-concurrent-downloads",
    "max-concurrent-uploads",
    "max-download-attempts",
    "network-diagnostic-port",
    "registry-mirrors",
    "runtimes",
    "shutdown-timeout",
}


def read_login(path, field="docker_registry_logins", host_name=None):
    """``(username, password)`` from a control-node file holding ``USERNAME:PASSWORD`` on its first
    line; a file that others than its owner can read is refused, naming it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ConfigError(field, f"{path}: {error.strerror}", host=host_name) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            field,
            f"{path}: readable by others than its owner (mode {stat.S_IMODE(mode):o}); chmod 600 {path}",
            host=host_name,
        )
    lines = Path(path).read_text().splitlines()
    username, sep, password = lines[0].partition(":") if lines else ("", "", "")
    if not sep or not username or not password:
        raise ConfigError(field, f"{path}: its first line must be USERNAME:PASSWORD", host=host_name)
    return username, password


def check_registry_files(data, host_name):
    for registry, path in (data.get("docker_registry_logins") or {}).items():
        read_login(path, field=f"docker_registry_logins[{registry!r}]", host_name=host_name)
    for registry, path in (data.get("docker_registry_ca_files") or {}).items():
        if not Path(path).is_file():
            raise ConfigError(
                f"docker_registry_ca_files[{registry!r}]", f"{path}: no such file on the control node", host=host_name
            )


def daemon_settings(log_max_size, log_max_file, extra, mirrors=()):
    """What gpufleet merges into daemon.json: json-file logs, rotated, registry mirrors, live-restore
    (containers keep running while dockerd restarts), extra keys."""
    return {
        "log-driver": "json-file",
        "log-opts": {"max-size": str(log_max_size), "max-file": str(log_max_file)},
        "live-restore": True,
        **({"registry-mirrors": list(mirrors)} if mirrors else {}),
        **extra,
    }


def _wanted_settings():
    data = host.data
    return daemon_settings(
        data.docker_log_max_size, data.docker_log_max_file, data.docker_daemon_settings, data.docker_registry_mirrors
    )


def needs_restart(current, settings):
    """Whether merging ``settings`` into daemon.json ``current`` (None: absent) changes a key dockerd
    only reads at start; False when every key that changes is one it reloads (``RELOADABLE``)."""
    merged = json_files.deep_merge(current or {}, settings)
    changed = {key for key in merged.keys() | (current or {}).keys() if merged.get(key) != (current or {}).get(key)}
    return bool(changed - RELOADABLE)


@deploy("Install Docker engine", data_defaults=settings.DEFAULTS)
def install_docker(packages: list[str] | None = None):
    """
    Install Docker from the distro and merge into daemon.json (other keys kept) what the settings say:
    log rotation (``docker_log_max_size``, ``docker_log_max_file``), Docker Hub mirrors
    (``docker_registry_mirrors``), more keys (``docker_daemon_settings``), and ``live-restore``.

    + packages: apt packages of the engine (``docker_packages``)

    Returns the daemon.json operation: pass it to ``restart_on_change``.
    """
    packages = packages or host.data.docker_packages

    apt.packages(
        name="Install the Docker engine packages",
        packages=packages,
        update=not host.data.get("gpufleet_offline"),
        cache_time=3600,
        no_recommends=True,
    )
    files.directory(name="Ensure /etc/docker exists", path="/etc/docker", mode="755")
    return json_files.merged(
        name=f"Merge log rotation and live-restore into {DAEMON_JSON}", path=DAEMON_JSON, settings=_wanted_settings()
    )


@deploy("Reach the site's container registries", data_defaults=settings.DEFAULTS)
def registry_access(ca_files: dict | None = None, logins: dict | None = None):
    """
    Trust each private registry's CA (``/etc/docker/certs.d/REGISTRY/ca.crt``, read by Docker at
    each connection: no restart), keep Docker logged in to those that need credentials, and install
    ``gpufleet-registry-digest`` (what a tag names in its registry now).

    + ca_files: registry -> CA certificate file on the control node (``docker_registry_ca_files``)
    + logins: registry -> root-only file on the control node holding ``USERNAME:PASSWORD``
      (``docker_registry_logins``); the password reaches the host on stdin only
    """
    ca_files = host.data.docker_registry_ca_files if ca_files is None else ca_files
    logins = host.data.docker_registry_logins if logins is None else logins
    files.directory(name=f"Ensure {TOOLS_DIR} exists", path=TOOLS_DIR, mode="755", user="root", group="root")
    files.put(
        name="Install the registry digest check",
        src=str(TEMPLATES / "gpufleet-registry-digest"),
        dest=f"{TOOLS_DIR}/gpufleet-registry-digest",
        mode="755",
        user="root",
        group="root",
        create_remote_dir=False,
    )  # ensured just above
    for registry, path in sorted(ca_files.items()):
        files.directory(name=f"Ensure {CERTS_DIR}/{registry} exists", path=f"{CERTS_DIR}/{registry}", mode="755")
        files.put(
            name=f"Trust {registry}'s CA",
            src=path,
            dest=f"{CERTS_DIR}/{registry}/ca.crt",
            mode="644",
            user="root",
            group="root",
        )
    for registry, path in sorted(logins.items()):
        username, password = read_login(path)
        docker_images.logged_in(
            name=f"Log Docker in to {registry} as {username}", registry=registry, username=username, password=password
        )


@deploy("Apply Docker configuration")
def restart_on_change(config_ops: list[OperationMeta]):
    """
    Keep Docker enabled and running; after one of ``config_ops`` changed, reload it when every
    daemon.json key that changes is one dockerd reloads (the toolkit's ``runtimes``, mirrors,
    ``live-restore``), restart it otherwise (log options), after a reload that turns live-restore on
    where the running dockerd has it off. Either way the containers keep running: live-restore is
    on, and each inference unit's main process waits out a dockerd restart.

    + config_ops: operations that write Docker's configuration (daemon.json, runtimes)

    With live-restore turned off (``docker_daemon_settings``) a restart stops the containers: on a
    host that serves it waits for the host's batch (``rolling``), said.

    Returns the reload and the restart where it is not held (handlers: they run only after a change).
    """
    changed = any_changed(*config_ops)
    wanted = _wanted_settings()
    current = json_files.read(DAEMON_JSON)
    restart = needs_restart(current, wanted)
    # A dockerd without live-restore stops the containers when it stops: a reload turns it on first.
    reload_first = restart and (current or {}).get("live-restore") is not True and wanted.get("live-restore")
    reloaded = systemd.service(
        name="Reload Docker if its configuration changed in keys it reloads (runtimes, mirrors, live-restore)",
        service="docker",
        reloaded=True,
        _if=lambda: changed() and (not restart or reload_first),
    )
    applied = [reloaded]
    if wanted.get("live-restore") is False and rolling.holds_restarts():
        logger.warning(
            f"[{host.name}] live-restore is off (docker_daemon_settings): restarting Docker stops the containers, "
            "so a restart waits for this host's batch"
        )
        rolling.defer(lambda: _restart(changed, restart, "live-restore off: it stops the containers"))
    else:
        applied.append(_restart(changed, restart, "containers keep running"))
    systemd.service(name="Keep Docker enabled and running", service="docker", running=True, enabled=True)
    return applied


def _restart(changed, restart, consequence):
    return systemd.service(
        name=f"Restart Docker if a key it reads only at start changed (log options); {consequence}",
        service="docker",
        restarted=True,
        _if=lambda: changed() and restart,
    )
