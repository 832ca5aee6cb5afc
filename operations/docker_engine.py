"""Docker engine: distro packages, /etc/docker/daemon.json merged (log rotation), the service."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, systemd

from . import json_ops

DAEMON_JSON = "/etc/docker/daemon.json"

DEFAULTS = {
    "docker_packages": ["docker.io"],
    "docker_log_max_size": "50m",
    "docker_log_max_file": 3,
    "docker_daemon_settings": {},
}


def daemon_settings(log_max_size, log_max_file, extra):
    """What gpufleet merges into daemon.json: json-file logs, rotated, plus any extra keys."""
    return {
        "log-driver": "json-file",
        "log-opts": {"max-size": str(log_max_size), "max-file": str(log_max_file)},
        **extra,
    }


@deploy("Install Docker engine", data_defaults=DEFAULTS)
def install_docker(packages=None, log_max_size=None, log_max_file=None, extra_settings=None):
    """
    Install Docker from the distro and merge log rotation into daemon.json (other keys kept).

    + packages: apt packages of the engine (``docker_packages``)
    + log_max_size: json-file ``max-size`` per container log (``docker_log_max_size``)
    + log_max_file: rotated files kept (``docker_log_max_file``)
    + extra_settings: more daemon.json keys to merge (``docker_daemon_settings``)

    Returns the daemon.json operation: pass it to ``restart_on_change``.
    """
    packages = packages or host.data.docker_packages
    log_max_size = log_max_size or host.data.docker_log_max_size
    log_max_file = log_max_file or host.data.docker_log_max_file
    extra_settings = extra_settings if extra_settings is not None else host.data.docker_daemon_settings

    apt.packages(
        name="Install the Docker engine packages",
        packages=packages,
        update=not host.data.get("gpufleet_offline"),
        cache_time=3600,
        no_recommends=True,
    )
    files.directory(name="Ensure /etc/docker exists", path="/etc/docker", mode="755")
    return json_ops.merged(
        name=f"Merge log rotation into {DAEMON_JSON}",
        path=DAEMON_JSON,
        settings=daemon_settings(log_max_size, log_max_file, extra_settings),
    )


@deploy("Apply Docker configuration")
def restart_on_change(config_ops):
    """
    Keep Docker enabled and running, restarting it only when one of ``config_ops`` changed.

    + config_ops: operations that write Docker's configuration (daemon.json, runtimes)

    Returns the service operation.
    """
    return systemd.service(
        name="Restart Docker if its configuration changed",
        service="docker",
        running=True,
        enabled=True,
        restarted=any(op.will_change for op in config_ops),
    )
