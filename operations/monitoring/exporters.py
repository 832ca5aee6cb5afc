"""
The node exporter of a host the site's monitoring hosts watch: the distribution's
``prometheus-node-exporter``, started with gpufleet's arguments (a drop-in written before the
package, so its first start already has them): its port, which gpufleet's firewall admits from the
monitoring hosts only, its systemd collector on gpufleet's units and the container engine's, and its
textfile collector reading what gpufleet's host metrics script writes every minute (the weights'
filesystem; on a GPU host, whether the driver reads and each GPU service sees its GPUs).
An inventory with no monitoring host: the exporter is stopped and disabled (the package stays).
"""

from io import StringIO

from jinja2 import Template
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from operations import TEMPLATES, TOOLS_DIR
from operations.core import settings
from operations.monitoring.inventory import left_over, watchers
from operations.services import firewall
from operations.toolkit import service_gpus

PACKAGE = "prometheus-node-exporter"
UNIT = "prometheus-node-exporter.service"
DROP_IN = f"/etc/systemd/system/{UNIT}.d/gpufleet.conf"
# The exporter's textfile collector reads *.prom here (the Debian package makes the directory).
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
# gpufleet's own host metrics for it: a script, a oneshot unit and its timer.
HOST_METRICS = "gpufleet-host-metrics"
HOST_METRICS_EVERY = 60  # seconds
# The units whose state the exporter reports (node_systemd_unit_state): gpufleet's, the engines'.
WATCHED_UNITS = "(gpufleet-.+|docker|containerd|nvidia-persistenced)[.]service"


def drop_in_text(port):
    """The exporter's drop-in: its command line with gpufleet's arguments (pure)."""
    template = Template((TEMPLATES / "gpufleet-node-exporter.conf.j2").read_text(), keep_trailing_newline=True)
    return template.render(port=port, units=WATCHED_UNITS, textfile_dir=TEXTFILE_DIR)


def host_metrics_units(weights_root, gpu_services):
    """The host metrics' service and timer (pure)."""
    values = {
        "tools_dir": TOOLS_DIR,
        "weights_root": weights_root,
        "out": f"{TEXTFILE_DIR}/gpufleet.prom",
        "services": gpu_services,
        "interval": HOST_METRICS_EVERY,
    }
    return {
        suffix: Template((TEMPLATES / f"{HOST_METRICS}.{suffix}.j2").read_text(), keep_trailing_newline=True).render(
            **values
        )
        for suffix in ("service", "timer")
    }


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
    _host_metrics()
    _firewall_unless_kept_elsewhere()
    return {"monitoring": {"node_exporter_port": port, "scraped_from": watching}}


def _host_metrics():
    """gpufleet's textfile metrics: the script, its unit and timer; written once now, then every minute."""
    script = files.put(
        name=f"Install {TOOLS_DIR}/{HOST_METRICS}",
        src=str(TEMPLATES / HOST_METRICS),
        dest=f"{TOOLS_DIR}/{HOST_METRICS}",
        mode="755",
    )
    written = [script]
    gpu_services = service_gpus.gpu_services(host.data.inference_services)
    for suffix, text in host_metrics_units(host.data.inference_weights_root, gpu_services).items():
        written.append(
            files.put(
                name=f"Install unit {HOST_METRICS}.{suffix}",
                src=StringIO(text),
                dest=f"/etc/systemd/system/{HOST_METRICS}.{suffix}",
                mode="644",
            )
        )
    systemd.daemon_reload(name=f"Reload systemd for {HOST_METRICS}", _if=any_changed(*written[1:]))
    systemd.service(
        name=f"Write the host metrics now ({HOST_METRICS}.service), as they are from now on",
        service=f"{HOST_METRICS}.service",
        restarted=True,
        _if=any_changed(*written),
    )
    systemd.service(
        name=f"Run {HOST_METRICS}.timer (every {HOST_METRICS_EVERY} s)",
        service=f"{HOST_METRICS}.timer",
        running=True,
        enabled=True,
    )


def _stop_if_installed():
    if PACKAGE in host.get_fact(DebPackages):
        systemd.service(
            name=f"Stop and disable {UNIT} (no monitoring host in the inventory)",
            service=UNIT,
            running=False,
            enabled=False,
        )
    if left_over(f"/etc/systemd/system/{HOST_METRICS}.timer"):
        systemd.service(
            name=f"Stop and disable {HOST_METRICS}.timer", service=f"{HOST_METRICS}.timer", running=False, enabled=False
        )
        removed = [
            files.file(name=f"Remove {path}", path=path, present=False)
            for path in (
                f"/etc/systemd/system/{HOST_METRICS}.timer",
                f"/etc/systemd/system/{HOST_METRICS}.service",
                f"{TOOLS_DIR}/{HOST_METRICS}",
                f"{TEXTFILE_DIR}/gpufleet.prom",
            )
        ]
        systemd.daemon_reload(name=f"Reload systemd without {HOST_METRICS}", _if=any_changed(*removed[:2]))


def _firewall_unless_kept_elsewhere():
    """gpufleet's table on a host whose services or gateway deploy does not write it (a Proxmox host,
    a monitoring host): the exporter's port alone, or no table."""
    if not {"gpu_hosts", "gateway_hosts"} & set(host.groups):
        firewall.admit_only_allowed(ports=[])
