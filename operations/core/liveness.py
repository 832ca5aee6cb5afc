"""
A frozen host (a hung kernel, a network black hole) stops answering while its TCP connection stays
open, and pyinfra would wait on it for ever, every other host with it: each operation waits for
every host. gpufleet watches each host's SSH connection: every ``gpufleet_liveness_interval``
seconds it asks the host's SSH server for a new channel (OpenSSH answers at once, however busy the
host) and closes it again; a host that grants none within ``gpufleet_liveness_timeout`` seconds is
taken as frozen: its connection is closed, so whatever waits on it fails, naming the host, and the
other hosts go on. A run after it answers again connects afresh. Byte streams through the OpenSSH
client (staging) carry the same bound as ``ServerAliveInterval``/``ServerAliveCountMax``.
"""

import gevent
from paramiko import SSHException
from pyinfra import logger

from operations.core import settings

# host names whose connection is watched in this run
_WATCHED = set()


def watch(host):
    """Watch ``host``'s SSH connection for the rest of the run (once; hosts not reached over SSH: never)."""
    if host.name in _WATCHED or not hasattr(host.connector, "client"):
        return
    _WATCHED.add(host.name)
    gevent.spawn(_watch, host, host.data.gpufleet_liveness_interval, host.data.gpufleet_liveness_timeout)


def watch_every_host(state):
    """Watch every host pyinfra connected to, from the first moment gpufleet's code runs: a host that
    freezes before its own turn in the plan is caught too."""
    for connected in list(state.active_hosts):
        watch(connected)


def answers(transport, timeout):
    """Whether the SSH server behind ``transport`` grants a session channel within ``timeout`` seconds."""
    try:
        transport.open_session(timeout=timeout).close()
    except Exception:  # paramiko's SSHException on a timeout, EOFError or OSError on a lost connection
        return False
    return True


def _watch(host, interval, timeout):
    while True:
        gevent.sleep(interval)
        client = host.connector.client
        transport = client.get_transport() if client else None
        if transport is None or not transport.is_active():
            return  # disconnected: the run is over, or pyinfra gave up on the host
        if not answers(transport, timeout):
            logger.error(
                f"[{host.name}] its SSH server granted no channel within {timeout} s "
                "(gpufleet_liveness_timeout): taken as frozen, its connection closed; the other hosts go on"
            )
            _close_as_frozen(transport, host.name, timeout)
            return


def _close_as_frozen(transport, name, timeout):
    """Close ``transport`` so that whatever waits on it fails as pyinfra expects a lost connection to:
    paramiko raises the transport's saved exception to a channel still being opened (its EOFError, which
    pyinfra's fact and command code does not catch, would end the whole run); here an SSHException
    naming the host, which fails only that host."""
    frozen = SSHException(f"{name}: no answer within {timeout} s (gpufleet_liveness_timeout): taken as frozen")
    transport.get_exception = lambda: frozen
    transport.close()


def openssh_options(data):
    """The OpenSSH client's options for the same bound: a server alive check every interval, given up
    after the timeout."""
    interval = data.get("gpufleet_liveness_interval") or settings.DEFAULTS["gpufleet_liveness_interval"]
    timeout = data.get("gpufleet_liveness_timeout") or settings.DEFAULTS["gpufleet_liveness_timeout"]
    count = max(1, -(-int(timeout) // interval))
    return ["-o", f"ServerAliveInterval={interval}", "-o", f"ServerAliveCountMax={count}"]
