"""The inventory as monitoring reads it: every host of it, whether this run touches it or not (the
site's Prometheus watches the site, not the --limit)."""

from pyinfra import host

from operations.monitoring import targets


def run_hosts():
    """Every host of the inventory as ``(name, data, groups)``, data as a dict."""
    return [(other.name, other.data.dict(), set(other.groups)) for other in host.inventory]


def watchers():
    """The addresses of the inventory's monitoring hosts: who may scrape this host (none: not watched)."""
    return targets.monitoring_addresses(run_hosts())
