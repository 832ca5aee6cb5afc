"""
Rolling driver and toolkit upgrades (``upgrade.py``). The GPU hosts whose installed driver or
toolkit is not the pinned one go in batches of ``gpufleet_upgrade_batch``, in inventory order.
Each host of a batch is drained (its in-flight requests finish, then its services stop), upgraded
and brought back by the GPU host role, and verified serving; then the next batch starts. When more
than ``gpufleet_upgrade_max_failed`` hosts have failed, the hosts of the later batches are left as
they were, named. A run again resumes: hosts already upgraded are no longer pending.

pyinfra runs one operation at a time on every host. Every host takes part in each batch's gate (one
step they share), so a batch's operations run after the previous batch's and before the next's.
"""

from pyinfra import host, logger
from pyinfra.api import deploy, operation
from pyinfra.api.exceptions import OperationError
from pyinfra.facts.systemd import SystemdStatus

from operations.core import other_hosts
from operations.core.errors import ConfigError
from operations.driver import devices
from operations.driver import install as nvidia_driver
from operations.driver.devices import NvidiaKernelModule
from operations.services import auth_proxy, rolling
from operations.services.facts import InstalledServices, ServiceReady
from operations.services.inference import readiness, with_listen
from operations.toolkit import install as nvidia_toolkit

# host name -> what its upgrade changes (computed once per run, when its deploy is planned)
_PENDING = {}
# hosts whose services this run has drained (their drain ran)
DRAINED = set()


def rolls(candidate):
    """True for a host ``upgrade.py`` rolls: a GPU host that is not an LXC guest (a guest follows its
    Proxmox host, and both are upgraded in place, as ``deploy.py`` does)."""
    return "gpu_hosts" in candidate.groups and "lxc_guests" not in candidate.groups


def pending():
    """What upgrading this host changes (``["driver 535.261.03 -> 535.309.01"]``); empty when its
    installed driver and toolkit are the pinned ones, or not installed yet (nothing serves there)."""
    changes = []
    driver = nvidia_driver.upgrade_from()
    if driver:
        changes.append(f"driver {driver[0]} -> {driver[1]}")
    toolkit = nvidia_toolkit.upgrade_from()
    if toolkit:
        changes.append(f"toolkit {toolkit[0]} -> {toolkit[1]}")
    return changes


def pending_of(other):
    if other.name not in _PENDING:
        _PENDING[other.name] = other_hosts.answer(other, "pending", pending)
    return _PENDING[other.name]


def batches():
    """The rollout's batches of host names: the connected hosts that roll and have an upgrade pending,
    in inventory order, ``gpufleet_upgrade_batch`` at a time (the same setting on every one)."""
    members = [other for other in host.inventory if other in host.state.active_hosts and rolls(other)]
    names = [other.name for other in _one_batch_size(members) if pending_of(other)]
    rolling.IN_PLACE.update(names)  # drained in their batch: their services restart there
    return _in_batches(names)


def restart_batches():
    """The batches of the serving hosts whose service restarts were held (``rolling``), in inventory
    order, ``gpufleet_upgrade_batch`` at a time."""
    return _in_batches([other.name for other in _one_batch_size(rolling.serving_hosts())])


def _one_batch_size(members):
    """``members``, once they all have the same ``gpufleet_upgrade_batch``."""
    sizes = {other.name: other.data.gpufleet_upgrade_batch for other in members}
    if len(set(sizes.values())) > 1:
        raise ConfigError(
            "gpufleet_upgrade_batch",
            "must be the same on every host of a rollout, got "
            + ", ".join(f"{name}: {size}" for name, size in sizes.items()),
            host=host.name,
        )
    return members


def _in_batches(names):
    size = host.data.gpufleet_upgrade_batch
    return [names[start : start + size] for start in range(0, len(names), size)]


def restart_held_in_batches():
    """
    deploy.py and upgrade.py, once every host's roles are planned: the held service starts of the
    serving hosts (``rolling``), batch by batch. Every host takes each batch's gate, so a batch's
    restarts (each after its open requests finished, each waited for until it answers) run after
    the previous batch's and before the next's; once more than ``gpufleet_upgrade_max_failed`` of
    these hosts failed, the later batches keep serving as they were, named.
    """
    batches = restart_batches()
    for number in host.loop(range(len(batches))):
        batch_gate(
            name=f"Service restarts, batch {number + 1} of {len(batches)}: go on unless too many hosts failed",
            number=number,
            batches=batches,
            max_failed=host.data.gpufleet_upgrade_max_failed,
        )
        if host.name in batches[number]:
            _held_starts()


@deploy("Service restarts, host by host")
def _held_starts():
    """This host's held steps: its services restarted where needed, running, answering; then pruning."""
    for start in rolling.held():
        start()


def refuse_unloadable_driver(batches):
    """
    Refuse, before any host is drained, to roll a driver change onto a GPU host that may not reboot: its
    new module loads only at boot, so with ``nvidia_driver_reboot`` off the new user space would run over
    the old module (NVML: "Driver/library version mismatch") and the host would fail in its batch, drained.
    A host without a GPU loads no module and rolls as it is.
    """
    if not any(host.name in batch for batch in batches) or host.data.nvidia_driver_reboot:
        return
    driver = nvidia_driver.upgrade_from()
    if driver and devices.gpus():
        raise ConfigError(
            "nvidia_driver_reboot",
            f"is False, but upgrade.py would move this GPU host's driver {driver[0]} -> {driver[1]}, whose module "
            "loads only after a reboot (until then its services fail: Driver/library version mismatch). Set "
            "nvidia_driver_reboot = True for the rollout (each host reboots within its batch, drained, and is "
            "verified on the new module before the next batch), or keep the pin. Nothing was changed",
            host=host.name,
        )


def rollout_failures(failed_hosts, batches):
    """The names of the failed hosts that belong to the rollout: pyinfra counts every host that failed,
    those it could not connect to among them, and one unreachable host elsewhere in the inventory is
    not a host this rollout upgraded (so it takes nothing from ``gpufleet_upgrade_max_failed``)."""
    rolled = {name for batch in batches for name in batch}
    return sorted(other.name for other in failed_hosts if other.name in rolled)


@operation()
def batch_gate(number: int, batches: list[list[str]], max_failed: int):
    """
    Before batch ``number``: once more than ``max_failed`` hosts have failed, every host of this and
    the later batches fails here, left as it was, naming the hosts that failed. Every host takes
    this step in every batch (which orders the batches); it changes nothing.
    """
    batch = batches[number]
    where = f"batch {number + 1} of {len(batches)} ({', '.join(batch)})"
    if not any(host.name in later for later in batches[number:]):
        host.noop(f"{where}: this host's batch is done")
        return
    failed = rollout_failures(host.state.failed_hosts, batches)
    if len(failed) > max_failed:
        drained = [name for name in failed if name in DRAINED]
        raise OperationError(
            f"{host.name}: rollout halted before {where}: {len(failed)} host(s) failed ({', '.join(failed)}), "
            f"more than gpufleet_upgrade_max_failed = {max_failed}. {host.name} was left as it was (serving, "
            "not upgraded)"
            + (f"; left drained (services stopped) until a run converges them: {', '.join(drained)}" if drained else "")
            + ". Fix what failed, then run upgrade.py again: it goes on from there"
        )
    if host.name in batch:
        host.noop(
            f"{where}: {'; '.join(_PENDING.get(host.name, [])) or 'its services restart where needed'}; "
            f"{len(failed)} failed so far "
            f"(gpufleet_upgrade_max_failed = {max_failed})"
        )
    else:
        host.noop(f"{where}: this host's batch comes later")
    yield from ()


@operation()
def drained(ports: list[int], timeout: int):
    """
    Let this host's inference services finish their requests, then stop them: waits until no
    connection to ``ports`` is established (at most ``timeout`` seconds), then stops the proxies,
    then the engines. Nothing to do when none runs.
    """
    DRAINED.add(host.name)
    installed = host.get_fact(InstalledServices)
    running = host.get_fact(SystemdStatus, services=sorted(installed)) if installed else {}
    units = sorted(
        (unit for unit in installed if running.get(unit)), key=lambda unit: (not installed[unit]["proxy"], unit)
    )
    if not units:
        host.noop("no inference service running")
        return
    if ports:
        yield rolling.drain_command(ports, timeout)
    yield f"systemctl stop {' '.join(units)}"


@operation()
def verified(services: list[dict], gpus: int):
    """
    Fail this host, saying it is left drained, unless it serves again: on a GPU host the loaded
    module is the installed driver's version; every service of the host answers on its endpoint.
    """
    problems = []
    if gpus:
        loaded = host.get_fact(NvidiaKernelModule)
        installed = nvidia_driver.installed_version()
        if loaded is None or loaded["version"] != installed:
            problems.append(
                f"loaded NVIDIA module {loaded and loaded['version']} is not the installed driver "
                f"{installed} (reboot it: nvidia_driver_reboot = True lets the rollout do so)"
            )
    for service in with_listen(services):
        ready = host.get_fact(ServiceReady, **readiness(service))
        if not ready["ready"]:
            problems.append(f"service {service['name']} not ready: {ready['reason']}")
        elif service.get("proxy_port"):
            ready = host.get_fact(ServiceReady, **auth_proxy.readiness(service))
            if not ready["ready"]:
                problems.append(f"service {service['name']}'s proxy not ready: {ready['reason']}")
    if problems:
        raise OperationError(f"{host.name}: upgraded but not serving, left drained: {'; '.join(problems)}")
    host.noop(f"{'; '.join(_PENDING.get(host.name, [])) or 'converged'}; {len(services)} service(s) ready")
    yield from ()


_LOGGED = []


def log_plan(plan):
    """Say the rollout's batches once per run."""
    if _LOGGED:
        return
    _LOGGED.append(plan)
    described = []
    for number, batch in enumerate(plan):
        hosts = ", ".join(f"{name} ({'; '.join(_PENDING[name])})" for name in batch)
        described.append(f"batch {number + 1}: {hosts}")
    logger.info(
        "Rollout: " + ("; ".join(described) or "every host's driver and toolkit are the pinned ones: nothing to roll")
    )
