"""Runs last: the lab leaves nothing behind (containers, volumes, networks, firewall rules)."""

import subprocess

from tests.lab import hosts as lab_hosts


def test_down_leaves_nothing(lab):
    lab_hosts.down()
    label = f"label={lab_hosts.LABEL}"
    assert lab_hosts.docker("ps", "-a", "--filter", label, "--format", "{{.Names}}") == ""
    assert lab_hosts.docker("network", "ls", "--filter", label, "--format", "{{.Name}}") == ""
    volumes = lab_hosts.docker("volume", "ls", "--format", "{{.Name}}").split()
    assert not [v for v in volumes if v.startswith("gpufleet-lab")]
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert lab_hosts.GAP_BRIDGE not in rules
