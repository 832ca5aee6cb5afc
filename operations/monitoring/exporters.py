"""
The node exporter of a host the site's monitoring hosts watch: the distribution's
``prometheus-node-exporter``, started with gpufleet's arguments (a drop-in written before the
package, so its first start already has them): its port, which gpufleet's firewall admits from the
monitoring hosts only, and its systemd collector on gpufleet's units and the container engine's.
An inventory with no monitoring host: the exporter is stopped and disabled (the package stays).
"""

from io import StringIO

from jinja2 import Template
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, systemd

from operations import TEMPLATES
from operations.core import settings
from operations.monitoring.inventory import watchers
from operations.services import firewall

PACKAGE = "prometheus-node-exporter"
UNIT = "prometheus-node-exporter.service"
DROP_IN = f"/etc/systemd/system/{UNIT}.d/gpufleet.conf"
# The units whose state the exporter reports (node_systemd_unit_state): gpufleet's, the engines'.
WATCHED_UNITS = "(gpufleet-.+|docker|containerd|nvidia-persistenced)[.]service"


def drop_in_text(port):
    """The exporter's drop-in: its command line with gpufleet's arguments (pure)."""
    template = Template((TEMPLATES / "gpufleet-node-exporter.conf.j2").read_text(), keep_trailing_newline=True)
    return template.render(port=port, units=WATCHED_UNITS)


@deploy("Export this host's metrics", data_defaults=settings.DEFAULTS)
def install():
    """
    Run the node exporter for the inventory's monitoring hosts, or stop it when there are none.
    Returns what host.json records of it.
    """
    watching = watchers()
    if not watching:
        _stop_if_installed()
        _firewall_unless_kept_elsewhere()
        return {}
    port = host.data.monitoring_node_exporter_port
    drop_in = files.put(
        name=f"Write {DROP_IN} (port {port}, gpufleet's units watched)",
        src=StringIO(drop_in_text(port)),
        dest=DROP_IN,
        mode="644",
        user="root",
        group="root",
    )
    systemd.daemon_reload(name=f"Reload systemd for {DROP_IN}", _if=drop_in.did_change)
    packages = apt.packages(
        name="Install the node exporter (the distribution's)", packages=[PACKAGE], no_recommends=True
    )
    systemd.service(
        name=f"Restart {UNIT} with gpufleet's arguments",
        service=UNIT,
        restarted=True,
        _if=lambda: drop_in.did_change() and not packages.did_change(),
    )
    systemd.service(name=f"Run {UNIT} on port {port}", service=UNIT, running=True, enabled=True)
    _firewall_unless_kept_elsewhere()
    return {"monitoring": {"node_exporter_port": port, "scraped_from": watching}}


def _stop_if_installed():
    if PACKAGE in host.get_fact(DebPackages):
        systemd.service(
            name=f"Stop and disable {UNIT} (no monitoring host in the inventory)",
            service=UNIT,
            running=False,
            enabled=False,
        )


def _firewall_unless_kept_elsewhere():
    """gpufleet's table on a host whose services or gateway deploy does not write it (a Proxmox host,
    a monitoring host): the exporter's port alone, or no table."""
    if not {"gpu_hosts", "gateway_hosts"} & set(host.groups):
        firewall.admit_only_allowed(ports=[])
