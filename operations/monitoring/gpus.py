"""
GPU metrics for the site's monitoring hosts: NVIDIA's dcgm-exporter as a gpufleet unit on a GPU host
of a watched inventory (``monitoring_gpu_metrics``), its image pinned and loaded by the deploy (the
unit never pulls), its collectors file gpufleet's (``templates/gpufleet-dcgm-counters.csv``: the
default set plus what the alert rules read). On the host network, on ``monitoring_dcgm_exporter_port``,
which gpufleet's firewall admits from the monitoring hosts only. A host without a GPU skips it and
says so; an inventory without a monitoring host has it stopped and removed.
"""

from io import StringIO

from jinja2 import Template
from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import files, systemd

from operations import TEMPLATES
from operations.core import settings
from operations.monitoring.inventory import left_over, watchers
from operations.services.names import unit_path

UNIT = "gpufleet-dcgm-exporter.service"
CONTAINER = "gpufleet-dcgm-exporter"
COUNTERS = "dcgm-counters.csv"  # in gpufleet_config_dir


def wanted(gpus):
    """Whether this host runs the GPU exporter: watched, metrics asked for, and a GPU to read."""
    return bool(watchers()) and host.data.monitoring_gpu_metrics and gpus > 0


def unit_text(image, port, counters):
    """The exporter's unit (pure: checked with ``systemd-analyze verify``)."""
    template = Template((TEMPLATES / "gpufleet-dcgm-exporter.service.j2").read_text(), keep_trailing_newline=True)
    return template.render(image=image, port=port, counters=counters, container=CONTAINER)


@deploy("Export the GPUs' metrics", data_defaults=settings.DEFAULTS)
def install(gpus: int, image_op=None):
    """
    Run dcgm-exporter on this GPU host, or say why not; remove it where it is no longer wanted.

    + gpus: the GPUs the host has
    + image_op: the operation that loaded or pulled its image (a new image restarts it)
    """
    if not wanted(gpus):
        if watchers() and host.data.monitoring_gpu_metrics:
            logger.warning(
                f"[{host.name}] no NVIDIA GPU on this host: dcgm-exporter skipped (set monitoring_gpu_metrics "
                "= False for it, so that the monitoring hosts do not wait for its GPU metrics)"
            )
        _remove_if_present()
        return {}
    counters = f"{host.data.gpufleet_config_dir}/{COUNTERS}"
    image, port = host.data.monitoring_dcgm_exporter_image, host.data.monitoring_dcgm_exporter_port
    counters_op = files.put(
        name=f"Write {counters} (the fields dcgm-exporter reports)",
        src=str(TEMPLATES / "gpufleet-dcgm-counters.csv"),
        dest=counters,
        mode="644",
    )
    unit = files.put(
        name=f"Install unit {UNIT} ({image}, port {port})",
        src=StringIO(unit_text(image, port, counters)),
        dest=unit_path(UNIT),
        mode="644",
    )
    systemd.daemon_reload(name=f"Reload systemd for {UNIT}", _if=unit.did_change)
    changed = [op for op in (counters_op, unit, image_op) if op]
    systemd.service(
        name=f"Restart {UNIT} after its unit, fields or image changed",
        service=UNIT,
        restarted=True,
        _if=lambda: any(op.did_change() for op in changed),
    )
    systemd.service(name=f"Run {UNIT}", service=UNIT, running=True, enabled=True)
    return {"gpu_metrics_port": port}


def _remove_if_present():
    if left_over(unit_path(UNIT)):
        systemd.service(name=f"Stop and disable {UNIT}", service=UNIT, running=False, enabled=False)
        unit = files.file(name=f"Remove unit {UNIT}", path=unit_path(UNIT), present=False)
        files.file(name=f"Remove {COUNTERS}", path=f"{host.data.gpufleet_config_dir}/{COUNTERS}", present=False)
        systemd.daemon_reload(name=f"Reload systemd without {UNIT}", _if=unit.did_change)
