"""The inventory as monitoring reads it: who watches (every host of it, whether this run touches it
or not: the site's Prometheus watches the site, not the --limit), and what monitoring left on a host."""

from pyinfra.api import FactBase

from operations.core import host_memo
from operations.core.site_hosts import site_hosts
from operations.monitoring import targets

# What gpufleet's monitoring leaves on a host, looked for in one command when it has to go.
LEFTOVERS = (
    "/etc/prometheus/gpufleet",
    "/etc/systemd/system/gpufleet-host-metrics.timer",
    "/etc/systemd/system/gpufleet-dcgm-exporter.service",
)


class PresentPaths(FactBase):
    """
    Returns which of the given paths exist on the host.

    .. code:: python

        ["/etc/prometheus/gpufleet"]
    """

    default = list

    def command(self, paths):
        return "".join(f"[ -e {path} ] && echo {path}; " for path in paths) + "true"

    def process(self, output):
        return [line for line in output if line.startswith("/")]


def left_over(path):
    """Whether ``path`` (one of LEFTOVERS) is on this host: one fact for all of them, asked once."""
    return path in host_memo.fact(PresentPaths, paths=LEFTOVERS)


@host_memo.per_run
def watchers():
    """The addresses of the inventory's monitoring hosts: who may scrape this host (none: not watched)."""
    return targets.monitoring_addresses(site_hosts())
