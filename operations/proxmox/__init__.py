"""Proxmox VE: the host's kernel module and device nodes, and each LXC guest's passthrough
configuration (``passthrough``), from what ``pct`` and /proc say (``facts``)."""
