"""
An authenticating proxy in front of an inference service (a service's ``proxy_port``): the engine
listens on 127.0.0.1 only, without a key of its own, and ``gpufleet-NAME-proxy.service`` listens on
the service's address, admitting only requests that carry the service's API key as a bearer token.
This is how an engine without authentication (Ollama) is served beyond the host. The proxy is a
standard-library Python script (templates/gpufleet-auth-proxy): started by systemd as root, it
reads the root-only key file and binds its port, then drops to the service's own account for good
before serving (systemd's credentials need a ramfs, which containers and LXC guests may not mount).
"""

from io import StringIO

from jinja2 import Template
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, systemd

from operations import TEMPLATES, TOOLS_DIR
from operations.core import settings, systemd_syntax
from operations.services import engines
from operations.services.names import proxy_unit_name, unit_path


def engine_side(service):
    """What the engine of a proxied service is: on 127.0.0.1, with no key (the proxy checks it)."""
    return {**{k: v for k, v in service.items() if k not in ("api_key_file", "proxy_port")}, "listen": engines.LOOPBACK}


def ready_urls(service):
    """The proxy's own readiness: the engine's endpoints through the proxy, with the key."""
    address = engines.probe_address(service)
    host_part = f"[{address}]" if ":" in address else address
    return [f"http://{host_part}:{service['proxy_port']}{path}" for path in engines.ENGINES[service["engine"]]["ready"]]


def unit_text(service, user, key_file, start_timeout):
    """The proxy's unit (pure: unit-tested with ``systemd-analyze verify``)."""
    return Template((TEMPLATES / "gpufleet-auth-proxy.service.j2").read_text(), keep_trailing_newline=True).render(
        name=service["name"],
        listen=engines.listen(service),
        port=service["proxy_port"],
        upstream_port=engines.port(service),
        key_file=key_file,
        user=user,
        tools_dir=TOOLS_DIR,
        start_timeout=int(service.get("start_timeout", start_timeout)),
        ready_urls=systemd_syntax.command_line(ready_urls(service)),
    )


@deploy("Run the authenticating proxy", data_defaults=settings.DEFAULTS)
def install(service: dict, user: str, key_file: str, new_key: bool, ready: dict, start_timeout: int | None = None):
    """
    Install and run ``service``'s proxy, restarted when its unit, its script or its key changed,
    or when it did not answer with the key; it is ready when the engine's endpoints answer through it.

    + service: the service (its ``listen`` is where the proxy listens, its ``proxy_port`` the port)
    + user: ``UID:GID`` the proxy runs as (the service's account)
    + key_file: the key file on the host (root only; the proxy reads it before dropping to ``user``)
    + new_key: whether this run writes other bytes into it (a mode fix alone restarts nothing)
    + ready: whether it answered through the proxy with the key before this run (``ServiceReady``
      of ``ready_urls``)
    + start_timeout: seconds the proxy may take to answer (``inference_start_timeout``)
    """
    start_timeout = start_timeout or host.data.inference_start_timeout
    unit = proxy_unit_name(service["name"])
    apt.packages(name="Install python3 (the proxy's interpreter)", packages=["python3"])
    script = files.put(
        name="Install the authenticating proxy",
        src=str(TEMPLATES / "gpufleet-auth-proxy"),
        dest=f"{TOOLS_DIR}/gpufleet-auth-proxy",
        mode="755",
    )
    unit_op = files.put(
        name=f"Install unit {unit}",
        src=StringIO(unit_text(service, user, key_file, start_timeout)),
        dest=unit_path(unit),
        mode="644",
        user="root",
        group="root",
        create_remote_dir=False,
    )
    systemd.daemon_reload(name=f"Reload systemd for {unit}", _if=unit_op.did_change)
    systemd.service(
        name=f"Restart {unit} after its unit, script or key changed, or it was not ready",
        service=unit,
        restarted=True,
        _if=restart_needed(ready, new_key, unit_op, script),
    )
    systemd.service(
        name=f"Run {unit} on {engines.listen(service)}:{service['proxy_port']} and wait until ready",
        service=unit,
        running=True,
        enabled=True,
    )


def restart_needed(ready, new_key, unit_op, script):
    """The condition pyinfra checks (``_if``) once the earlier operations ran: restart the proxy when it
    did not answer with the key before this run, its key's bytes change, or its unit or script changed."""

    def needed():
        return not ready["ready"] or new_key or unit_op.did_change() or script.did_change()

    return needed
