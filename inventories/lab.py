"""The built-in lab: hosts started by ``python -m tests.lab up``, read from .lab/lab.json."""

import json
from pathlib import Path

_LAB = Path(__file__).resolve().parent.parent / ".lab"
_STATE = json.loads((_LAB / "lab.json").read_text()) if (_LAB / "lab.json").exists() else {"hosts": []}


def _ssh(host):
    """How the control node reaches a lab host: lab-1 and lab-gap-1 as the sudo user ``gpufleet``
    (root's SSH login is off there, as on Ubuntu's images), the others as root."""
    sudo = {"_sudo": True} if host["user"] != "root" else {}
    return {
        **sudo,
        "ssh_hostname": "127.0.0.1",
        "ssh_port": host["port"],
        "ssh_user": host["user"],
        "ssh_key": str(_LAB / "id_ed25519"),
        "ssh_known_hosts_file": "/dev/null",
        "ssh_strict_host_key_checking": "no",
        "lab_address": host["address"],
        "gpufleet_site_address": host["address"],  # lab hosts reach each other on the lab network
    }


def _guest(host):
    """A lab-ct-N host plays the LXC guest 101 of lab-pve-N (restarts allowed: the double records them)."""
    number = host["name"].rsplit("-", 1)[1]
    return {**_ssh(host), "proxmox_host": f"lab-pve-{number}", "proxmox_vmid": 101,
            "proxmox_guest_restart": True}


# lab-pve-N: a Proxmox VE host double (tests/fixtures/proxmox_double: pct, /etc/pve, a loaded
# module's /proc/devices and device nodes); it owns the kernel module and passes devices on.
proxmox_hosts = [(h["name"], _ssh(h)) for h in _STATE["hosts"] if h["name"].startswith("lab-pve-")]
# Every other lab host plays a GPU host (none has a GPU: the deploy says so and skips GPU steps).
gpu_hosts = [(h["name"], _guest(h) if h["name"].startswith("lab-ct-") else _ssh(h))
             for h in _STATE["hosts"] if not h["name"].startswith("lab-pve-")]
# lab-ct-N: LXC guests of lab-pve-N: user-space driver at the host's version, toolkit without cgroups.
lxc_guests = [h["name"] for h in _STATE["hosts"] if h["name"].startswith("lab-ct-")]
# Air-gapped lab hosts: no route out; group_data/airgapped.py sends them to the bundle.
airgapped = [h["name"] for h in _STATE["hosts"] if h["airgapped"]]
