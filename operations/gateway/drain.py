"""
A served host leaving and rejoining the gateways' pools around its own restarts. ``drained`` sets
its server in a service's pool to drain at every gateway of the run (no new request goes to it;
open ones go on) and waits, at most the given seconds, until none is in flight to it; ``readmitted``
sets it ready again and waits until the gateway's health check says it is UP, so the next batch
only drains once this host takes requests. Both run in the served host's turn and act on each
gateway over the gateway's own connection (``gpufleet-gateway-ctl``, HAProxy's runtime API).
``put_back_where_left_out`` converges what an earlier run left: a server it drained and did not
put back (a rollout halted on its host) returns once its service answers.
"""

import shlex

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, OperationError, operation

from operations import TOOLS_DIR
from operations.core import other_hosts
from operations.core.remote import Shell
from operations.gateway.facts import HeldOutServers


def gateways():
    """The gateway hosts of this run that are still going (connected, not failed)."""
    return [other for other in host.inventory if "gateway_hosts" in other.groups and other in host.state.active_hosts]


def _held_out_at(gateway, service):
    """Whether ``gateway`` holds this host's server in ``service``'s pool out (set to drain or maint)."""
    held = other_hosts.answer(gateway, "held out", lambda: gateway.get_fact(HeldOutServers))
    return f"{service}/{host.name}" in held


def _at_gateways(state, host, action, service, timeout, targets):  # pyinfra passes state and host by these names
    """Run ``gpufleet-gateway-ctl ACTION SERVICE HOST TIMEOUT`` at each gateway; a drain that ran out of
    time is said (the host goes on), a server not back UP fails the served ``host``."""
    tool = f"{TOOLS_DIR}/gpufleet-gateway-ctl"
    asked = f"{tool} {action} {shlex.quote(service)} {shlex.quote(host.name)} {int(timeout)}"
    command = f"if [ -x {tool} ]; then {asked}; else echo 'no gateway installed there yet'; fi"
    for gateway in targets:
        lines = Shell.of(state, gateway).run(f"{command}; echo __status=$?")
        status = lines[-1].split("=", 1)[1] if lines and lines[-1].startswith("__status=") else "?"
        said = "; ".join(lines[:-1])
        logger.info(f"[{host.name}] gateway {gateway.name}: {said}")
        if status != "0" and action == "ready":
            raise OperationError(f"{host.name}: gateway {gateway.name} does not take it back: {said}")
        if status != "0":
            logger.warning(f"[{host.name}] gateway {gateway.name}: {said}: stopping anyway")


def _ready_timeout():
    """Seconds a server put back may take to be UP at a gateway: 10 check intervals and 30 s."""
    return host.data.gateway_check_interval * 10 + 30


def _at_every_gateway(action, service, timeout):
    """The command an operation yields to run ``action`` at every gateway of the run (none: said)."""
    targets = gateways()
    if not targets:
        host.noop("no gateway in this run")
        return
    yield FunctionCommand(_at_gateways, [action, service, timeout, targets], {})


@operation(is_idempotent=False)
def drained(service: str, timeout: int):
    """
    Take this host's server out of ``service``'s pool at every gateway of the run, and wait until no
    request is in flight to it (at most ``timeout`` seconds; then it goes on, saying so).
    """
    yield from _at_every_gateway("drain", service, timeout)


@operation(is_idempotent=False)
def readmitted(service: str):
    """
    Put this host's server back into ``service``'s pool at every gateway of the run, and wait until
    its health check there says UP (at most 10 check intervals and 30 s; the host fails otherwise).
    """
    yield from _at_every_gateway("ready", service, _ready_timeout())


@operation()
def put_back_where_left_out(service: str):
    """
    Put this host's server back into ``service``'s pool at the gateways of the run that hold it out
    (set to drain or maintenance, read when the run starts: an earlier run drained it and stopped,
    as a rollout halted on this host does), and wait until UP there. Call it where the service
    answers; nothing where every gateway has it in.
    """
    held_out = [gateway for gateway in gateways() if _held_out_at(gateway, service)]
    if not held_out:
        host.noop(f"{service}: in the pool at every gateway of the run")
        return
    yield FunctionCommand(_at_gateways, ["ready", service, _ready_timeout(), held_out], {})
