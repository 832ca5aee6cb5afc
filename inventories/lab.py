"""The built-in lab: hosts started by ``python -m tests.lab up``, read from .lab/lab.json."""

import json
from pathlib import Path

_LAB = Path(__file__).resolve().parent.parent / ".lab"
_STATE = json.loads((_LAB / "lab.json").read_text()) if (_LAB / "lab.json").exists() else {"hosts": []}


def _ssh(host):
    return {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": host["port"],
        "ssh_user": "root",
        "ssh_key": str(_LAB / "id_ed25519"),
        "ssh_known_hosts_file": "/dev/null",
        "ssh_strict_host_key_checking": "no",
        "lab_address": host["address"],
    }


# Every lab host plays a GPU host (none has a GPU: the deploy says so and skips GPU steps).
gpu_hosts = [(h["name"], _ssh(h)) for h in _STATE["hosts"]]
# Air-gapped lab hosts: no route out; group_data/airgapped.py sends them to the bundle.
airgapped = [h["name"] for h in _STATE["hosts"] if h["airgapped"]]
