"""
The authenticating TLS front of an inference service (a service's ``proxy_port``): the engine
listens on 127.0.0.1 only, without a key of its own, and ``gpufleet-NAME-proxy.service`` runs
HAProxy from the distribution on the service's address, with the site's certificate
(``site_tls``), admitting only requests that carry one of the service's API keys as a bearer token.
This is how an engine without authentication (Ollama), or whose key leaves routes open (vLLM,
TGI), is served beyond the host. Started by systemd as root, HAProxy reads the root-only key and
certificate files and binds its port, then serves as the service's own account in a chroot; a
change of keys or certificate reloads it (open requests finish), a change of its unit restarts it.
"""

import posixpath
from io import StringIO

from jinja2 import Template
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, server, systemd

from operations import TEMPLATES, TOOLS_DIR
from operations.core import base, checks, settings, systemd_syntax
from operations.monitoring.inventory import watchers
from operations.services import engines, site_tls
from operations.services.names import proxy_unit_name, unit_path


def engine_side(service):
    """What the engine of a proxied service is: on 127.0.0.1, with no key (the front checks it)."""
    return {**{k: v for k, v in service.items() if k not in ("api_key_file", "proxy_port")}, "listen": engines.LOOPBACK}


def ready_urls(service):
    """The front's own readiness: the engine's endpoints through it (TLS), with the key."""
    address = engines.probe_address(service)
    host_part = f"[{address}]" if ":" in address else address
    return [
        f"https://{host_part}:{service['proxy_port']}{path}" for path in engines.ENGINES[service["engine"]]["ready"]
    ]


def key_path(name):
    """The front's key file on the host (root only): ``<secrets>/NAME.key``."""
    return posixpath.join(base.secrets_dir(), f"{name}.key")


def readiness(service):
    """``ServiceReady``'s arguments for the front: its URLs, its key file, the site's CA."""
    return {
        "urls": ready_urls(service),
        "key_file": key_path(service["name"]),
        "key_var": "",
        "ca_file": site_tls.paths()["ca_at"],
    }


def config_path(name, config_dir=None):
    """The front's HAProxy configuration on the host."""
    return posixpath.join(config_dir or host.data.gpufleet_config_dir, "proxy", f"{name}.cfg")


def config_text(service, user, key_file, certificate, max_bytes, timeout, metrics_sources=()):
    """The front's HAProxy configuration (pure: unit-tested with ``haproxy -c``); the engine's own
    metrics path answers ``metrics_sources`` (the monitoring hosts) without a key."""
    uid, _, gid = user.partition(":")
    template = (TEMPLATES / "gpufleet-front.cfg.j2").read_text()
    return Template(template, keep_trailing_newline=True, trim_blocks=True).render(
        name=service["name"],
        listen=engines.listen(service),
        port=service["proxy_port"],
        upstream_port=engines.port(service),
        key_file=key_file,
        certificate=certificate,
        uid=uid,
        gid=gid or uid,
        max_bytes=max_bytes,
        timeout=timeout,
        ready_path=engines.ENGINES[service["engine"]]["ready"][0],
        metrics_exception=_metrics_exception(engines.ENGINES[service["engine"]].get("metrics"), metrics_sources),
    )


def _metrics_exception(path, sources):
    """The front's 401 condition's exception for the monitoring hosts' metrics requests (HAProxy ACLs)."""
    return f" || {{ path {path} }} {{ src {' '.join(sources)} }}" if path and sources else ""


def unit_text(service, user, key_file, ca_file, config, start_timeout):
    """The front's unit (pure: unit-tested with ``systemd-analyze verify``)."""
    return Template((TEMPLATES / "gpufleet-auth-proxy.service.j2").read_text(), keep_trailing_newline=True).render(
        name=service["name"],
        listen=engines.listen(service),
        port=service["proxy_port"],
        upstream_port=engines.port(service),
        key_file=key_file,
        ca_file=ca_file,
        config=config,
        user=user,
        tools_dir=TOOLS_DIR,
        start_timeout=int(service.get("start_timeout", start_timeout)),
        ready_urls=systemd_syntax.command_line(ready_urls(service)),
    )


@deploy("Run the authenticating TLS front", data_defaults=settings.DEFAULTS)
def install(
    service: dict, user: str, key_file: str, new_key: bool, tls: dict, ready: dict, start_timeout: int | None = None
):
    """
    Install and run ``service``'s front: restarted when its unit changed or it did not answer with
    the key, reloaded (open requests finish) when its configuration, keys or certificate changed; it
    is ready when the engine's endpoints answer through it.

    + service: the service (its ``listen`` is where the front listens, its ``proxy_port`` the port)
    + user: ``UID:GID`` the front serves as (the service's account)
    + key_file: the key file on the host (root only; one key per line)
    + new_key: whether this run writes other bytes into it (a mode fix alone reloads nothing)
    + tls: ``site_tls.install``'s answer (where the CA and the host's certificate are, and whether they changed)
    + ready: whether it answered through the front with the key before this run (``ServiceReady``
      of ``ready_urls``)
    + start_timeout: seconds the front may take to answer (``inference_start_timeout``)
    """
    start_timeout = start_timeout or host.data.inference_start_timeout
    unit, config = proxy_unit_name(service["name"]), config_path(service["name"])
    apt.packages(name="Install HAProxy (the services' fronts)", packages=["haproxy"])
    files.directory(name=f"Ensure {posixpath.dirname(config)} exists", path=posixpath.dirname(config), mode="755")
    config_op = files.put(
        name=f"Write {config}",
        src=StringIO(
            config_text(
                service,
                user,
                key_file,
                tls["pem_at"],
                max_bytes=checks.size_bytes(host.data.inference_max_request_bytes),
                timeout=host.data.inference_request_timeout,
                metrics_sources=watchers() if host.data.inference_firewall else (),
            )
        ),
        dest=config,
        mode="644",
        user="root",
        group="root",
    )
    unit_op = files.put(
        name=f"Install unit {unit}",
        src=StringIO(unit_text(service, user, key_file, tls["ca_at"], config, start_timeout)),
        dest=unit_path(unit),
        mode="644",
        user="root",
        group="root",
        create_remote_dir=False,
    )
    systemd.daemon_reload(name=f"Reload systemd for {unit}", _if=unit_op.did_change)
    server.shell(
        name=f"Enable {unit} as its unit now says (with multi-user.target and its engine)",
        commands=[f"systemctl reenable {unit}"],
        _if=unit_op.did_change,
    )
    systemd.service(
        name=f"Restart {unit} after its unit changed, or it was not ready",
        service=unit,
        restarted=True,
        _if=restart_needed(ready, unit_op),
    )
    systemd.service(
        name=f"Reload {unit} after its configuration, keys or certificate changed (open requests finish)",
        service=unit,
        reloaded=True,
        _if=reload_needed(ready, unit_op, config_op, new_key, tls),
    )
    systemd.service(
        name=f"Run {unit} on {engines.listen(service)}:{service['proxy_port']} and wait until ready",
        service=unit,
        running=True,
        enabled=True,
    )


def restart_needed(ready, unit_op):
    """The condition pyinfra checks (``_if``) once the earlier operations ran: restart the front when it
    did not answer with the key before this run, or its unit changed."""

    def needed():
        return not ready["ready"] or unit_op.did_change()

    return needed


def reload_needed(ready, unit_op, config_op, new_key, tls):
    """Reload a running front (not restarted now) whose configuration, keys or certificate changed."""

    def needed():
        restarted = not ready["ready"] or unit_op.did_change()
        return not restarted and (config_op.did_change() or new_key or tls["changed"]())

    return needed
