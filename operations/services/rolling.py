"""
Service restarts that roll host by host. On a host that serves when the run starts (one of its
gpufleet units running), what would restart its services (a unit, image, weights or secrets change,
or a service that is not ready) is held until the host's batch: the serving hosts in inventory order,
``gpufleet_upgrade_batch`` at a time, each batch's open requests finished, services restarted and
ready before the next batch starts (``rollout.restart_held_in_batches``, run by deploy.py and
upgrade.py). A host that serves nothing yet starts its services in place, at once. A change to the
container engine is not held: Docker keeps the containers running through it (live-restore, and
each unit's main process follows its container: ``gpufleet-container-follow``).
"""

import shlex

from pyinfra import host
from pyinfra.facts.systemd import SystemdStatus

from operations import TEMPLATES
from operations.core import other_hosts
from operations.services.facts import InstalledServices

# Waits until no connection to the given ports is established, at most N seconds (sent inline).
DRAIN = (TEMPLATES / "gpufleet-drain").read_text()
# host name -> the steps (functions) that start its services, held for its batch
_HELD = {}
# host name -> steps deferred to its batch before those (a Docker restart that would stop containers)
_DEFERRED = {}
# hosts whose services restart in place though they serve: upgrade.py's rolled hosts, drained already
IN_PLACE = set()


def serves(other=None):
    """Whether ``other`` (a host of the inventory; this host by default) ran one of its gpufleet
    inference units when the run started: it serves, and its restarts wait for its batch. Read once
    per run, however many hosts ask."""
    return other_hosts.answer(other or host._get_module(), "serves", _runs_a_unit)


def _runs_a_unit():
    installed = host.get_fact(InstalledServices)
    running = host.get_fact(SystemdStatus, services=sorted(installed)) if installed else {}
    return any(running.get(unit) for unit in installed)


def holds_restarts():
    """Whether this host's service restarts wait for its batch: it serves, and is not restarted in place."""
    return host.name not in IN_PLACE and serves()


def readmits_itself():
    """Whether this host puts its restarted services back into the gateways' pools itself: every host
    but upgrade.py's rolled ones, which are put back once verified (``roles.rolled_gpu_host``)."""
    return host.name not in IN_PLACE


def hold(steps):
    """Keep ``steps`` (functions adding the operations that start this host's services) for its batch
    when its restarts wait for it; True when held, False when the caller runs them now."""
    if not holds_restarts():
        return False
    _HELD[host.name] = list(steps)
    return True


def then(step):
    """Run ``step`` (a function adding operations) once this host's services have started: in its batch,
    after them, when they are held for it; now otherwise."""
    if host.name in _HELD:
        _HELD[host.name].append(step)
    else:
        step()


def defer(step):
    """Add ``step`` (a function adding operations) to this host's batch, before its services' steps."""
    _DEFERRED.setdefault(host.name, []).append(step)


def held():
    """This host's deferred and held steps, handed over once."""
    return _DEFERRED.pop(host.name, []) + _HELD.pop(host.name, [])


def serving_hosts():
    """The GPU hosts of this run (connected, in inventory order) whose service restarts are held."""
    return [
        other
        for other in host.inventory
        if other in host.state.active_hosts
        and "gpu_hosts" in other.groups
        and other.name not in IN_PLACE
        and serves(other)
    ]


def drain_command(ports, timeout):
    """The command that waits until no request is open on ``ports`` (at most ``timeout`` seconds)."""
    return f"sh -c {shlex.quote(DRAIN)} gpufleet-drain {int(timeout)} {shlex.quote(host.name)} " + " ".join(
        str(int(port)) for port in sorted(set(ports))
    )
