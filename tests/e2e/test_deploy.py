"""deploy.py over real SSH: converge, then converge again with zero changes, then check."""

import re
import subprocess
import sys

from tests.e2e.conftest import PYINFRA, REPO, run_deploy
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


def test_no_gpu_is_said_plainly(first_deploy):
    for name in (host["name"] for host in lab_hosts.deployed()):
        said = re.search(rf"\[{name}\] no NVIDIA GPU on this host .*: skipped (.*)", first_deploy.output)
        assert said and "GPU container run" in said.group(1), name
    assert "Run nvidia-smi in" not in first_deploy.output  # the GPU container check never ran


def test_testinfra_checks_pass_on_every_host(second_deploy, lab):
    hosts = ",".join(f"ssh://{host['name']}" for host in lab_hosts.deployed())
    checks = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/checks",
            f"--hosts={hosts}",
            f"--ssh-config={lab_hosts.SSH_CONFIG}",
            "--sudo",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checks.returncode == 0, checks.stdout[-4000:]
    assert " passed" in checks.stdout and " failed" not in checks.stdout


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
        dry = run_deploy("--dry", "--limit", "lab-2")
        assert dry.rc == 0, dry.output[-2000:]
        assert lab_hosts.ssh(lab["lab-2"], "test -e /etc/gpufleet/secrets", check=False).returncode != 0
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
        "Reload Docker if its configuration changed in keys it reloads only (runtimes, mirrors, live-restore)",
        "Restart Docker if a key it reads only at start changed (log options); containers keep running",
    ):
        assert rows[f"GPU host | Apply Docker configuration | {handler}"] == ["-", "1 (lab-2)"]
