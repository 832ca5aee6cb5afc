"""
The whole inventory as plain data, whatever the --limit: the site's gateways pool every host that
serves, and its monitoring hosts watch every host. Read once per run (``host_memo.per_run``), not
once per host.
"""

from pyinfra import host

from operations.core import host_memo


@host_memo.per_run
def site_hosts():
    """Every host of the inventory as ``(name, data, groups)``, data as a dict."""
    return [(other.name, other.data.dict(), set(other.groups)) for other in host.inventory]
