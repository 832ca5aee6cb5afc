"""
An example real fleet. Copy it, replace the names and addresses, then:

    pyinfra inventories/prod.py deploy.py --dry     # what would change
    pyinfra inventories/prod.py deploy.py           # converge
    pyinfra inventories/prod.py deploy.py --limit gpu-node-01

Groups gpufleet knows: gpu_hosts (driver, Docker, toolkit, inference services), airgapped
(install only from a staged bundle), proxmox_hosts and lxc_guests (GPU passthrough to LXC).
Settings go in group_data/<group>.py; see group_data/all.py for every tunable.

Hosts are reached as a sudo user (Ubuntu's images and most hardened servers turn root's SSH login
off); gpufleet refuses, before any host changes, a login that cannot become root. With a sudo that
asks for a password, add "_sudo_password" (read it from a file or your secret store, never commit
it). Logging in as root ("ssh_user": "root", no "_sudo") is the exception, e.g. a Proxmox VE host.
"""

_ssh = {"ssh_user": "ops", "ssh_key": "~/.ssh/id_ed25519", "_sudo": True}

gpu_hosts = [
    ("gpu-node-01.example.internal", {**_ssh}),
    ("gpu-node-02.example.internal", {**_ssh, "docker_log_max_size": "100m"}),
]

airgapped = [
    ("gpu-dark-01.example.internal", {**_ssh, "gpufleet_offline": True}),
]
