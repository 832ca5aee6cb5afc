"""deploy.py over real SSH: converge, then converge again with zero changes, then check."""

import re
import subprocess

import pytest

from bench.scale import commands_per_host
from tests.e2e.conftest import PYINFRA, REPO, Deploy, host_state, run_checks, run_deploy
from tests.lab import hosts as lab_hosts


def test_first_deploy_changes_every_host(first_deploy):
    changed = first_deploy.changed()
    assert changed, first_deploy.output[-3000:]
    hosts, success, error, _ = changed["Every host | Prepare gpufleet host | Ensure /etc/gpufleet exists"]
    deployed = len(lab_hosts.deployed())
    assert deployed == 7 and (hosts, success, error) == (deployed, deployed, 0)


def test_second_deploy_reports_zero_changes(second_deploy, lab):
    assert second_deploy.rc == 0, second_deploy.output[-3000:]
    operations, changed, errors, unchanged = second_deploy.grand_total()
    assert (changed, errors) == (0, 0), second_deploy.changed()
    assert operations == unchanged > 0
    # Every deployed lab host took part: connected and planned, so the Grand total counts its operations.
    for name in (host["name"] for host in lab_hosts.deployed()):
        assert re.search(rf"\[{name}\]\s+Connected", second_deploy.output), name
        assert re.search(rf"\[{name}\]\s+Ready: deploy.py", second_deploy.output), name


# Commands a converged lab host may run on a no-op, facts included (issue 33's goal): its facts are
# read in one command, those its last run asked (operations/core/fact_reads.py). Before: 58-117 per
# host as typed (lab-1 83), 93 on lab-1 with -y; pyinfra 3 alone, reading every fact again at
# execution: 107-242 (lab-1 170).
NOOP_COMMANDS_BUDGET = 10


def logged_deploy(*options):
    """``pyinfra --debug [OPTIONS] inventories/lab.py deploy.py``, confirmed at its prompt where it asks."""
    completed = subprocess.run(
        [PYINFRA, "--debug", *options, "inventories/lab.py", "deploy.py"],
        cwd=REPO,
        input="\n",  # "Press enter to execute..."
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in order: what ran before the prompt, and after
        text=True,
        timeout=900,
    )
    completed.stderr = ""
    return Deploy(completed)


@pytest.mark.parametrize("options", [(), ("-y",)], ids=["as-typed", "yes"])
def test_a_converged_host_runs_few_commands(second_deploy, options):
    """On converged hosts, as users type it (pyinfra shows the changes, then runs them) and with ``-y``:
    0 changes, at most ``NOOP_COMMANDS_BUDGET`` commands per host in all, none once execution begins."""
    logged = logged_deploy(*options)
    assert logged.rc == 0 and logged.grand_total()[1:3] == (0, 0), logged.output[-3000:]
    counted = commands_per_host(logged.output)
    assert set(counted) == {host["name"] for host in lab_hosts.deployed()}, counted
    assert max(counted.values()) <= NOOP_COMMANDS_BUDGET, counted
    if not options:
        assert "Beginning operation run" in logged.output, logged.output[-3000:]
        _, executing = logged.output.split("--> Beginning operation run", 1)
        ran = [line for line in executing.splitlines() if "Running command on" in line]
        assert not ran, ran[:5]


def test_no_gpu_is_said_plainly(first_deploy):
    for name in (host["name"] for host in lab_hosts.deployed()):
        said = re.search(rf"\[{name}\] no NVIDIA GPU on this host .*: skipped (.*)", first_deploy.output)
        assert said and "GPU container run" in said.group(1), name
    assert "Run nvidia-smi in" not in first_deploy.output  # the GPU container check never ran


# The host-by-host checks each lab host must pass, from what the lab makes it (inventories/lab.py,
# tests/lab/hosts.py), not from what it records: one that records less, and so is checked less, fails.
EVERY_HOST = {
    "test_config_dir_is_root_owned",
    "test_secrets_dir_is_root_only",
    "test_driver_packages_at_the_pinned_version_and_held",
    "test_driver_pin_is_the_configured_version_or_of_its_branch",
    "test_nvidia_packages_kept_out_of_unattended_upgrades",
    "test_recorded_gpu_count_matches_hardware",
}
KERNEL_MODULE = {"test_nouveau_blacklisted"}  # every host that owns the kernel module (not a guest)
# the NVIDIA module on disk for the running kernel: where the lab runs a distribution's kernel
# (lab-2: Debian's, lab-ubu-1: Ubuntu's records, lab-pve-1: Proxmox's records)
MODULE_BUILT = {"test_the_running_kernel_has_the_nvidia_module_of_the_pinned_version"}
DOCKER = {
    "test_daemon_json_has_nvidia_runtime_and_log_rotation",
    "test_daemon_json_rotates_json_file_logs",
    "test_docker_is_enabled_and_running",
    "test_docker_lists_the_nvidia_runtime",
    "test_engine_uses_the_configured_log_driver",
    "test_toolkit_packages_pinned_and_held",
}
SERVING = {
    "test_engine_caches_are_the_services_own_and_mounted",
    "test_firewall_table_loaded_from_its_file_for_every_service_port",
    "test_keyed_services_refuse_requests_without_key",
    "test_ports_listening",
    "test_readiness_endpoints_answer",
    "test_secrets_root_only_and_not_in_units",
    "test_units_enabled_and_running",
}
PROXMOX_HOST = {
    "test_device_nodes_created_before_guests_start",
    "test_every_guest_gets_every_nvidia_node",
    "test_modules_load_at_boot",
}
LXC_GUEST = {"test_guest_has_no_kernel_module_package", "test_guest_toolkit_leaves_cgroups_to_the_host"}
MUST_PASS = {
    "lab-1": EVERY_HOST | KERNEL_MODULE | DOCKER | SERVING,
    "lab-2": EVERY_HOST | KERNEL_MODULE | MODULE_BUILT | DOCKER | SERVING,
    "lab-gap-1": EVERY_HOST | KERNEL_MODULE | DOCKER | SERVING,
    "lab-net-1": EVERY_HOST | KERNEL_MODULE | DOCKER | SERVING,
    "lab-ubu-1": EVERY_HOST | KERNEL_MODULE | MODULE_BUILT | DOCKER,  # no service: it is there for its driver
    "lab-pve-1": EVERY_HOST | KERNEL_MODULE | MODULE_BUILT | PROXMOX_HOST,
    "lab-ct-1": EVERY_HOST | DOCKER | SERVING | LXC_GUEST,
}


def test_testinfra_checks_pass_on_every_host(second_deploy, lab):
    """Every host passes exactly the checks the lab makes it for; the rest (GPU-only: no GPU here) skip."""
    checks, outcomes = run_checks(["tests/checks"], [host["name"] for host in lab_hosts.deployed()])
    assert checks.returncode == 0, checks.stdout[-4000:]
    passed = {name: set() for name in MUST_PASS}
    for (check, name), outcome in outcomes.items():
        if outcome == "PASSED":
            passed.setdefault(name, set()).add(check)
    assert passed == MUST_PASS, {
        name: {"missing": sorted(MUST_PASS.get(name, set()) - got), "extra": sorted(got - MUST_PASS.get(name, set()))}
        for name, got in passed.items()
        if got != MUST_PASS.get(name)
    }


def test_typo_in_settings_stops_before_any_host_changes(second_deploy, lab):
    before = lab_hosts.ssh(lab["lab-1"], "stat -c %Y /etc/gpufleet/host.json").stdout
    result = run_deploy("--data", "docker_log_max_fil=5")
    assert result.rc != 0
    assert "docker_log_max_fil: unknown setting (did you mean 'docker_log_max_file'?)" in result.output
    assert "Starting operation" not in result.output
    assert lab_hosts.ssh(lab["lab-1"], "stat -c %Y /etc/gpufleet/host.json").stdout == before


def test_a_misspelt_key_without_a_known_prefix_stops_the_run_too(second_deploy):
    result = run_deploy("--data", "infrence_services=[]", "--limit", "lab-1")
    assert result.rc != 0
    assert "infrence_services: unknown setting (did you mean 'inference_services'?)" in result.output
    assert "Starting operation" not in result.output


def test_bad_value_names_the_field(second_deploy):
    result = run_deploy("--data", "docker_log_max_size=lots")
    assert result.rc != 0
    assert "docker_log_max_size: must be a size such as '50m'" in result.output


def test_dry_run_changes_nothing(second_deploy, lab):
    lab_hosts.ssh(lab["lab-2"], "rm -rf /etc/gpufleet/secrets")
    try:
        before = host_state(lab["lab-2"])
        dry = run_deploy("--dry", "--limit", "lab-2")
        assert dry.rc == 0, dry.output[-2000:]
        assert lab_hosts.ssh(lab["lab-2"], "test -e /etc/gpufleet/secrets", check=False).returncode != 0
        assert host_state(lab["lab-2"]) == before  # units, records, apt, daemon.json, containers
    finally:
        assert run_deploy("--limit", "lab-2").rc == 0
    assert lab_hosts.ssh(lab["lab-2"], "stat -c %a /etc/gpufleet/secrets").stdout.strip() == "700"


def test_dry_run_of_a_converged_host_predicts_no_change_and_lists_handlers_as_conditional(second_deploy):
    # Without -y pyinfra detects changes before it would ask; --dry stops there (stdin closed).
    dry = subprocess.run(
        [PYINFRA, "inventories/lab.py", "deploy.py", "--dry", "--limit", "lab-2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0 and "--> Detected changes:" in output, output[-2000:]
    table = output.split("--> Detected changes:")[1].splitlines()[2:]
    rows = {}
    for line in table:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != 3:
            break
        rows[cells[0]] = cells[1:]
    assert len(rows) >= 30, table[:5]
    assert {change for change, _ in rows.values()} == {"-"}, {name: row for name, row in rows.items() if row[0] != "-"}
    # Reactions to a change are handlers (_if=): pyinfra says they run only if their trigger changes.
    for handler in (
        "Reload Docker if its configuration changed in keys it reloads (runtimes, mirrors, live-restore)",
        "Restart Docker if a key it reads only at start changed (log options); containers keep running",
    ):
        assert rows[f"GPU host | Apply Docker configuration | {handler}"] == ["-", "1 (lab-2)"]
