"""One lab per test session: hosts come up once, are deployed once, and go down at the end."""

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import testinfra

from tests.lab import hosts as lab_hosts

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))


REPO_LAB = REPO / ".lab"
_preparing = ThreadPoolExecutor(max_workers=1)
_prepared = []


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session):
    """When end-to-end tests will run, what the lab is made from (images, the toolkit doubles, the
    offline bundle: ``lab_hosts.prepare``) is built or checked while the unit tests run: cold, that is
    minutes of compiling, installing and hashing. The lab fixture waits for it; what it says goes to
    .lab/prepare.log."""
    if any("/e2e/" in str(item.fspath) for item in session.items):
        REPO_LAB.mkdir(exist_ok=True)
        log_file = (REPO_LAB / "prepare.log").open("a")

        def log(*words):
            print(time.strftime("%H:%M:%S"), *words, file=log_file, flush=True)

        _prepared.append(_preparing.submit(lab_hosts.prepare, log=log))


class Deploy:
    """The result of one ``pyinfra inventories/lab.py deploy.py`` run."""

    def __init__(self, completed):
        self.rc = completed.returncode
        self.output = completed.stdout + completed.stderr

    def _rows(self):
        for line in self.output.split("--> Results:")[-1].splitlines():
            match = re.match(r"^\s+(.+?)\s{2,}(\d+)\s+(\d+|-)\s+(\d+|-)\s+(\d+|-)\s*$", line)
            if match:
                yield match.group(1), tuple(0 if v == "-" else int(v) for v in match.groups()[1:])

    def results(self):
        """{operation name: (hosts, success, error, no_change)} from pyinfra's results table (two
        operations of one name, on different hosts, share a row here: use ``grand_total`` to count)."""
        return {name: row for name, row in self._rows() if name != "Grand total"}

    def grand_total(self):
        """pyinfra's own Grand total row: (host-operations, changed, errors, unchanged)."""
        totals = [row for name, row in self._rows() if name == "Grand total"]
        assert totals, f"no Grand total in pyinfra's output: {self.output[-2000:]}"
        return totals[-1]

    def total_changed(self):
        """Host-operations that changed something, by pyinfra's Grand total (every host, every operation)."""
        return self.grand_total()[1]

    def changed(self):
        return {name: row for name, row in self.results().items() if row[1]}


def measurements(name, **first):
    """A module's measurements (``first`` and what its tests add), written to
    .lab/measurements/NAME.json when the module ends: ``yield from`` it in a module fixture."""
    results = dict(first)
    yield results
    path = REPO / ".lab" / "measurements" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def until(condition, seconds, every=1):
    """Seconds until ``condition()`` held (asked every ``every`` seconds), or None when it did not
    within ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return round(time.monotonic() - started, 1)
        time.sleep(every)
    return None


def run_checks(paths, hosts):
    """Run the host-by-host checks ``paths`` (under tests/checks) against lab ``hosts`` (names) as an
    operator runs them: pytest-testinfra over the lab's SSH config, with sudo. Returns the finished
    process and each check's outcome, ``{(check, host): "PASSED" | "FAILED" | "ERROR"}``."""
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *paths]
        + [f"--hosts={','.join(f'ssh://{name}' for name in hosts)}", f"--ssh-config={lab_hosts.SSH_CONFIG}", "--sudo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = re.findall(r"^(PASSED|FAILED|ERROR) tests/checks/\S+::(\w+)\[ssh://([\w-]+)\]", completed.stdout, re.M)
    return completed, {(check, host): outcome for outcome, check, host in found}


def host_state(host):
    """What a run that changes nothing must leave as it was on lab host ``host`` (its state dict): the
    digests of gpufleet's units, host.json, apt's preferences and sources, Docker's daemon.json and
    the weight volumes' records, the modes of gpufleet's directories, and the running containers."""
    files = (
        "/etc/systemd/system/gpufleet-*.service /etc/gpufleet/host.json /etc/apt/preferences.d/* "
        "/etc/apt/sources.list.d/* /etc/docker/daemon.json /srv/gpufleet/weights/*/.gpufleet-*"
    )
    state = lab_hosts.ssh(
        host,
        f"sha256sum {files} 2>/dev/null; stat -c '%n %a %U' /etc/gpufleet /etc/gpufleet/* 2>/dev/null; "
        "docker ps -q --no-trunc | sort",
        check=False,
    ).stdout
    assert "/etc/gpufleet/host.json" in state and "gpufleet-chat.service" in state, state
    return state


def run_deploy(*args, deploy="deploy.py", inventory="inventories/lab.py", env=None):
    completed = subprocess.run(
        [PYINFRA, "-y", inventory, deploy, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    return Deploy(completed)


@pytest.fixture(scope="session")
def lab():
    for prepared in _prepared:
        prepared.result()
    state = lab_hosts.up(
        count=2, airgapped=1, proxmox=1, connected=1, ubuntu=1, fresh=not os.environ.get("GPUFLEET_LAB_REUSE")
    )
    yield {host["name"]: host for host in state["hosts"]}
    if not os.environ.get("GPUFLEET_LAB_KEEP"):
        lab_hosts.down()


@pytest.fixture(scope="session")
def first_deploy(lab):
    result = run_deploy()
    assert result.rc == 0, result.output[-4000:]
    return result


@pytest.fixture(scope="session")
def second_deploy(first_deploy):
    return run_deploy()


@pytest.fixture(scope="session")
def lab_host(lab):
    """testinfra host for a lab host name, over real SSH, through sudo (some logins are not root)."""

    def connect(name):
        return testinfra.get_host(f"ssh://{name}", ssh_config=str(lab_hosts.SSH_CONFIG), sudo=True)

    return connect
