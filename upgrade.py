"""
gpufleet's rolling upgrade: change nvidia_driver_version or nvidia_toolkit_version, then

    pyinfra inventories/prod.py upgrade.py [--dry] [--limit HOST]

Every host gets what deploy.py gives it, except the GPU hosts whose installed driver or toolkit is
not the pinned one: they go in batches of gpufleet_upgrade_batch, in inventory order, each host
drained (open requests finish, its services stop), upgraded by the GPU host role (services started
again, each waited for until ready), and verified serving before the next batch starts. Once more
than gpufleet_upgrade_max_failed hosts have failed, the later batches are left as they were and
named; run it again and it goes on from there (upgraded hosts are no longer pending). Proxmox hosts
and their LXC guests are upgraded in place, as deploy.py does (operations/rollout.py). The other
serving hosts' service restarts then roll batch by batch, as in deploy.py.
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
    guest_driver = proxmox.guest_driver_version() if "lxc_guests" in host.groups else None
    batches = rollout.batches()
    rollout.refuse_unloadable_driver(batches)
    rollout.log_plan(batches)
    rolling = any(host.name in batch for batch in batches)

    summary, guest_changes = roles.every_host(), []
    if "proxmox_hosts" in host.groups:
        proxmox_summary, guest_changes = roles.proxmox_host()
        summary.update(proxmox_summary)
    if "gpu_hosts" in host.groups and not rolling:
        summary.update(roles.lxc_guest(guest_driver) if "lxc_guests" in host.groups else roles.gpu_host())
    for number in host.loop(range(len(batches))):
        # every host takes each batch's gate: batch N+1's steps wait for batch N's
        rollout.batch_gate(
            name=f"Rollout batch {number + 1} of {len(batches)}: go on unless too many hosts failed",
            number=number,
            batches=batches,
            max_failed=host.data.gpufleet_upgrade_max_failed,
        )
        if host.name in batches[number]:
            summary.update(roles.rolled_gpu_host())
    summary.update(roles.gateway_host())  # in gateway_hosts: the site's gateway; otherwise none left
    summary.update(roles.monitoring())  # exporters for the monitoring hosts; Prometheus on them
    # The serving hosts' service restarts, held by their roles, roll batch by batch.
    rollout.restart_held_in_batches()
    roles.finish(summary, guest_changes)
