"""
gpufleet: turn the inventory's hosts into GPU inference hosts.

    pyinfra inventories/prod.py deploy.py [--dry] [--diff] [--limit HOST]

A host plays the roles its groups name (operations/roles.py); what each concern does is in
operations/. Settings (and the offline bundle, when one is named) are checked first: a bad value
stops the run before any host changes. A Proxmox VE host (proxmox_hosts) passes its GPUs to the
LXC guests (lxc_guests) that name it; a guest's libraries follow its host's driver version. On hosts
that serve, service restarts wait for their batch (gpufleet_upgrade_batch hosts at a time, in
inventory order): the fleet never restarts all at once (operations/services/rolling.py).
"""

from pyinfra import host

from operations import roles, rollout
from operations.core import fact_reads, lean_planning
from operations.proxmox import passthrough as proxmox

# A fact once read stands while nothing has run on any host (pyinfra 3 would read it again), and a
# host's facts are read in one command, those its last run asked: a converged host is read once.
fact_reads.install()
# pyinfra's planning, the same answers with less work (call sites from frames, argument types once).
lean_planning.install()

# A host that fails while planned (frozen) leaves the plan; the others go on.
with roles.planned_unless_failed():
    roles.check_settings()
    # A guest's driver is its Proxmox host's: a guest pinned to another version is refused up front.
    guest_driver = proxmox.guest_driver_version() if "lxc_guests" in host.groups else None

    summary, guest_changes = roles.every_host(), []
    if "proxmox_hosts" in host.groups:
        proxmox_summary, guest_changes = roles.proxmox_host()
        summary.update(proxmox_summary)
    if "gpu_hosts" in host.groups:
        summary.update(roles.lxc_guest(guest_driver) if "lxc_guests" in host.groups else roles.gpu_host())
    summary.update(roles.gateway_host())  # in gateway_hosts: the site's gateway; otherwise none left
    summary.update(roles.monitoring())  # exporters for the monitoring hosts; Prometheus on them
    # The serving hosts' service restarts, held by their roles, roll batch by batch.
    rollout.restart_held_in_batches()
    roles.finish(summary, guest_changes)
