"""
The TLS front of a RAG stack the site's gateway serves (``rag_gateway_port``): Open WebUI listens on
127.0.0.1 only, and ``gpufleet-rag-front.service`` runs HAProxy from the distribution on
``inference_listen:rag_front_port`` with the site's certificate (``site_tls``), passing what comes
to Open WebUI, which signs people in itself. The gateway reaches it over TLS checked against the
site's CA; gpufleet's firewall admits its port from ``inference_allowed_sources`` only (the host
itself always). Started by systemd as root, HAProxy reads the root-only certificate and binds its
port, then serves as Open WebUI's account in a chroot; a change of its configuration or certificate
reloads it (open pages reconnect), a change of its unit restarts it.
"""

import posixpath
from io import StringIO

from jinja2 import Template
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from operations import TEMPLATES, TOOLS_DIR
from operations.core import settings
from operations.services import engines, site_tls
from operations.services.names import unit_name, unit_path

FRONT = "rag-front"


def config_path(config_dir):
    """The front's HAProxy configuration on the host."""
    return posixpath.join(config_dir, "proxy", f"{FRONT}.cfg")


def ready_url(listen, port):
    """Open WebUI's health through the front (TLS), as the host itself reaches it."""
    address = engines.probe_address({"listen": listen})
    return f"https://{'[' + address + ']' if ':' in address else address}:{port}/health"


def config_text(listen, port, upstream_port, certificate, user, timeout):
    """The front's HAProxy configuration (pure: unit-tested with ``haproxy -c``)."""
    uid, _, gid = user.partition(":")
    return Template((TEMPLATES / "gpufleet-rag-front.cfg.j2").read_text(), keep_trailing_newline=True).render(
        listen=listen,
        port=port,
        upstream_port=upstream_port,
        certificate=certificate,
        uid=uid,
        gid=gid,
        timeout=timeout,
    )


def unit_text(listen, port, upstream_port, config, ca_file, user, start_timeout):
    """The front's unit (pure: unit-tested with ``systemd-analyze verify``)."""
    return Template((TEMPLATES / "gpufleet-rag-front.service.j2").read_text(), keep_trailing_newline=True).render(
        listen=listen,
        port=port,
        upstream_port=upstream_port,
        config=config,
        ca_file=ca_file,
        user=user,
        tools_dir=TOOLS_DIR,
        start_timeout=start_timeout,
        ready_url=ready_url(listen, port),
    )


@deploy("Run the RAG stack's TLS front", data_defaults=settings.DEFAULTS)
def install(user: str):
    """
    Install and run the front of Open WebUI (after it: ``PartOf`` it), ready when Open WebUI's health
    answers through it.

    + user: ``UID:GID`` the front serves as (Open WebUI's account)
    """
    data = host.data
    unit, config = unit_name(FRONT), config_path(data.gpufleet_config_dir)
    listen, port = data.inference_listen, data.rag_front_port
    was_running = bool(host.get_fact(SystemdStatus).get(unit))
    tls = site_tls.install()
    apt.packages(name="Install HAProxy (the RAG stack's front)", packages=["haproxy"])
    files.directory(name=f"Ensure {posixpath.dirname(config)} exists", path=posixpath.dirname(config), mode="755")
    config_op = files.put(
        name=f"Write {config}",
        src=StringIO(config_text(listen, port, data.rag_port, tls["pem_at"], user, data.inference_request_timeout)),
        dest=config,
        mode="644",
        user="root",
        group="root",
    )
    unit_op = files.put(
        name=f"Install unit {unit}",
        src=StringIO(unit_text(listen, port, data.rag_port, config, tls["ca_at"], user, data.rag_start_timeout)),
        dest=unit_path(unit),
        mode="644",
        user="root",
        group="root",
    )
    systemd.daemon_reload(name=f"Reload systemd for {unit}", _if=unit_op.did_change)
    if was_running:
        systemd.service(
            name=f"Restart {unit} after its unit changed", service=unit, restarted=True, _if=unit_op.did_change
        )
        systemd.service(
            name=f"Reload {unit} after its configuration or certificate changed",
            service=unit,
            reloaded=True,
            _if=lambda: not unit_op.did_change() and (config_op.did_change() or tls["changed"]()),
        )
    systemd.service(
        name=f"Run {unit} on {listen}:{port} and wait until Open WebUI answers through it",
        service=unit,
        running=True,
        enabled=True,
    )


@deploy("Remove the RAG stack's TLS front", data_defaults=settings.DEFAULTS)
def remove():
    """The front of a stack the gateway no longer serves (or that left ``rag_hosts``): stopped, its unit
    and configuration removed (HAProxy's package stays: other fronts may use it)."""
    unit = unit_name(FRONT)
    if not host.get_fact(File, path=unit_path(unit)):
        return
    systemd.service(
        name=f"Stop and disable {unit} (the gateway no longer serves the stack)",
        service=unit,
        running=False,
        enabled=False,
    )
    removed = files.file(name=f"Remove unit {unit}", path=unit_path(unit), present=False)
    files.file(
        name=f"Remove {config_path(host.data.gpufleet_config_dir)}",
        path=config_path(host.data.gpufleet_config_dir),
        present=False,
    )
    systemd.daemon_reload(name=f"Reload systemd without {unit}", _if=any_changed(removed))


def exposed(data):
    """Whether the site's gateway serves this host's stack (pure)."""
    return bool(data.get("rag_gateway_port"))
