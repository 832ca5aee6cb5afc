"""The liveness watch (operations/core/liveness.py) on stand-in SSH transports: a server that grants a
channel is left alone, one that grants none within the timeout is taken as frozen and its connection
closed; the OpenSSH client gets the same bound."""

import gevent
from paramiko import SSHException

from operations.core import liveness


class Channel:
    def close(self):
        pass


class Transport:
    def __init__(self, frozen_after):
        self.asked, self.closed, self.frozen_after = 0, False, frozen_after

    def is_active(self):
        return not self.closed

    def open_session(self, timeout):
        self.asked += 1
        if self.asked > self.frozen_after:
            gevent.sleep(timeout)  # what a frozen server does: nothing, until paramiko gives up
            raise SSHException("Timeout opening channel.")
        return Channel()

    def close(self):
        self.closed = True


class Client:
    def __init__(self, transport):
        self.transport = transport

    def get_transport(self):
        return self.transport


class Connector:
    def __init__(self, transport):
        self.client = Client(transport)


class Host:
    def __init__(self, name, transport, interval=0.01, timeout=0.05):
        self.name, self.connector = name, Connector(transport)
        self.data = type("Data", (), {"gpufleet_liveness_interval": interval, "gpufleet_liveness_timeout": timeout})


def test_a_host_that_stops_granting_channels_is_closed_and_a_live_one_is_not():
    frozen, live = Transport(frozen_after=3), Transport(frozen_after=10**9)
    liveness.watch(Host("frozen-1", frozen))
    liveness.watch(Host("live-1", live))
    gevent.sleep(0.5)
    assert frozen.closed and frozen.asked == 4  # three answers, then none within the timeout
    assert not live.closed and live.asked > 10
    live.close()  # the run is over: the watch ends
    gevent.sleep(0.05)


def test_the_openssh_client_gives_up_after_the_same_bound():
    options = liveness.openssh_options({"gpufleet_liveness_interval": 10, "gpufleet_liveness_timeout": 25})
    assert options == ["-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
