"""
The site's Prometheus on a host of ``monitoring_hosts``: the distribution's ``prometheus`` package,
started with gpufleet's arguments (a drop-in written before the package, so its first start already
has them: 127.0.0.1 only, gpufleet's configuration, retention and storage path). Its targets are
written from the inventory (``targets.py``) into files Prometheus reads again by itself; its
configuration and alert rules reload it (HUP: no sample lost). A host that left the group has
Prometheus stopped and disabled and gpufleet's configuration removed; its samples stay.
"""

import json
from io import BytesIO, StringIO

from jinja2 import Environment, Template
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from operations import TEMPLATES
from operations.core import settings
from operations.core.site_hosts import site_hosts
from operations.monitoring import targets
from operations.monitoring.inventory import left_over
from operations.services import site_tls

PACKAGE = "prometheus"
UNIT = "prometheus.service"
DROP_IN = f"/etc/systemd/system/{UNIT}.d/gpufleet.conf"
CONFIG_DIR = "/etc/prometheus/gpufleet"
CONFIG = f"{CONFIG_DIR}/prometheus.yml"


def config_text(interval, gpu_labels=()):
    """Prometheus' configuration: gpufleet's jobs, each read from its targets file, GPU series labelled
    with their services (``targets.gpu_service_labels``) (pure: checked with ``promtool check config``)."""
    template = Template(
        (TEMPLATES / "gpufleet-prometheus.yml.j2").read_text(), keep_trailing_newline=True, trim_blocks=True
    )
    return template.render(dir=CONFIG_DIR, interval=interval, timeout=min(10, interval), gpu_labels=gpu_labels)


def rules_text(after, free_percent, gpu_temperature_limit=87):
    """gpufleet's alert rules with the site's thresholds (pure: tested with ``promtool test rules``)."""
    environment = Environment(variable_start_string="[[", variable_end_string="]]", keep_trailing_newline=True)
    template = environment.from_string((TEMPLATES / "gpufleet-alerts.yml.j2").read_text())
    return template.render(after=after, free_percent=free_percent, gpu_temperature_limit=gpu_temperature_limit)


def drop_in_text(port, retention, storage):
    """prometheus.service's drop-in: its command line with gpufleet's arguments (pure)."""
    template = Template((TEMPLATES / "gpufleet-prometheus.conf.j2").read_text(), keep_trailing_newline=True)
    return template.render(config=CONFIG, port=port, retention=retention, storage=storage)


def targets_text(entries):
    """One job's targets file (Prometheus' file-based discovery), stable for equal entries."""
    return json.dumps(entries, indent=2, sort_keys=True) + "\n"


@deploy("Run the site's Prometheus", data_defaults=settings.DEFAULTS)
def install():
    """
    Install Prometheus and run it with gpufleet's configuration, targets and alert rules. Returns
    what host.json records of it.
    """
    data = host.data
    port, storage = data.monitoring_prometheus_port, data.monitoring_storage_path
    hosts = site_hosts()
    found = targets.scrape_targets(hosts, settings.DEFAULTS)
    files.directory(name=f"Ensure {CONFIG_DIR}/targets exists", path=f"{CONFIG_DIR}/targets", mode="755")
    written = [
        files.put(
            name=f"Write the site's CA certificate {CONFIG_DIR}/site-ca.crt (the fronts are checked against it)",
            src=BytesIO(site_tls.ca_certificate(data.dict())),
            dest=f"{CONFIG_DIR}/site-ca.crt",
            mode="644",
        ),
        files.put(
            name=f"Write {CONFIG}",
            src=StringIO(config_text(data.monitoring_scrape_interval, targets.gpu_service_labels(hosts))),
            dest=CONFIG,
            mode="644",
        ),
        files.put(
            name=f"Write {CONFIG_DIR}/alerts.yml (gpufleet's alert rules)",
            src=StringIO(
                rules_text(
                    data.monitoring_alert_after,
                    data.monitoring_weights_free_percent,
                    data.monitoring_gpu_temperature_limit,
                )
            ),
            dest=f"{CONFIG_DIR}/alerts.yml",
            mode="644",
        ),
    ]
    for job, entries in found.items():
        files.put(
            name=f"Write the {job} targets ({len(entries)}; Prometheus reads them again by itself)",
            src=StringIO(targets_text(entries)),
            dest=f"{CONFIG_DIR}/targets/{job}.json",
            mode="644",
        )
    drop_in = files.put(
        name=f"Write {DROP_IN} (127.0.0.1:{port}, samples kept {data.monitoring_retention} in {storage})",
        src=StringIO(drop_in_text(port, data.monitoring_retention, storage)),
        dest=DROP_IN,
        mode="644",
    )
    systemd.daemon_reload(name=f"Reload systemd for {DROP_IN}", _if=drop_in.did_change)
    packages = apt.packages(name="Install Prometheus (the distribution's)", packages=[PACKAGE], no_recommends=True)
    systemd.service(
        name=f"Restart {UNIT} with gpufleet's arguments",
        service=UNIT,
        restarted=True,
        _if=lambda: drop_in.did_change() and not packages.did_change(),
    )
    systemd.service(
        name=f"Reload {UNIT} after its configuration, rules or CA changed",
        service=UNIT,
        reloaded=True,
        _if=lambda: any_changed(*written)() and not drop_in.did_change() and not packages.did_change(),
    )
    systemd.service(name=f"Run {UNIT} on 127.0.0.1:{port}", service=UNIT, running=True, enabled=True)
    return {
        "monitoring": {
            "prometheus": f"127.0.0.1:{port}",
            "config": CONFIG,
            "targets": {job: [entry["targets"][0] for entry in entries] for job, entries in found.items()},
        }
    }


@deploy("Remove the site's Prometheus", data_defaults=settings.DEFAULTS)
def remove_if_left():
    """A host no longer in ``monitoring_hosts``: Prometheus stopped and disabled, gpufleet's configuration
    and drop-in removed (the package and the samples stay)."""
    if not left_over(CONFIG_DIR):
        return
    systemd.service(
        name=f"Stop and disable {UNIT} (no longer in monitoring_hosts)", service=UNIT, running=False, enabled=False
    )
    files.directory(name=f"Remove {CONFIG_DIR}", path=CONFIG_DIR, present=False)
    drop_in = files.file(name=f"Remove {DROP_IN}", path=DROP_IN, present=False)
    systemd.daemon_reload(name=f"Reload systemd without {DROP_IN}", _if=drop_in.did_change)
