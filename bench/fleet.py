"""Fleet convergence: deploy.py against an Ansible playbook of the same steps, first run and no-op
re-run, on fresh lab hosts of each size, per variant: the naive playbook (directories with
`copy`), the tuned one (ansible.posix.synchronize, pipelining, ControlPersist, forks ≥ hosts, no
fact gathering) and the tuned one under Mitogen's strategy. A variant's times count only when the
hosts it converged pass the same testinfra checks (tests/checks) as gpufleet's."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.lab import hosts as lab

from . import procmem

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = REPO / "bench" / "out"
REF = OUT / "ansible-ref"


def pyinfra(*args):
    return procmem.run([str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploy.py", *args], cwd=REPO)


def pyinfra_changes(output):
    match = re.search(r"Grand total\s+(\d+)\s+(\d+|-)", output)
    return None if not match else (0 if match.group(2) == "-" else int(match.group(2)))


def ansible_inventory(state):
    lines = ["[lab]"]
    for host in state["hosts"]:
        become = "" if host["user"] == "root" else " ansible_become=true"  # a sudo login, as gpufleet uses
        lines.append(
            f"{host['name']} ansible_host=127.0.0.1 ansible_port={host['port']} ansible_user={host['user']} "
            f"ansible_ssh_private_key_file={lab.KEY_FILE}{become}"
        )
    path = OUT / "ansible-inventory.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


# variant -> (the playbook's tuned flag, Mitogen's strategy)
ANSIBLE = {"ansible_naive": (False, False), "ansible_tuned": (True, False), "ansible_mitogen": (True, True)}
VARIANTS = ("gpufleet", *ANSIBLE)


def ansible(state, forks, tuned=False, mitogen=False):
    manifest = json.loads((lab.STATE_DIR / "bundle" / "manifest.json").read_text())
    image = manifest["images"][0]
    extra = {
        "bundle_dir": str(lab.STATE_DIR / "bundle"),
        "ref_dir": str(REF),
        "repo_dir": str(REPO),
        "image_tag": image["name"],
        "image_file": image["file"],
        "tuned": tuned,
        **json.loads((REF / "account.json").read_text()),
    }
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "bench/ansible/ansible.cfg")}
    if mitogen:
        import ansible_mitogen

        env |= {
            "ANSIBLE_STRATEGY_PLUGINS": str(Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"),
            "ANSIBLE_STRATEGY": "mitogen_linear",
        }
    return procmem.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(ansible_inventory(state)),
            "-f",
            str(forks),
            "-e",
            json.dumps(extra),
            "bench/ansible/site.yml",
        ],
        cwd=REPO,
        env=env,
    )


def ansible_changes(output):
    counts = [int(n) for n in re.findall(r"changed=(\d+)", output)]
    failed = sum(int(n) for n in re.findall(r"(?:failed|unreachable)=(\d+)", output))
    return (sum(counts) if counts else None), failed


def save_reference(state):
    """Files gpufleet computed on a converged host, for the playbook to write identically."""
    REF.mkdir(parents=True, exist_ok=True)
    host = state["hosts"][0]
    for remote, name in (
        ("/etc/docker/daemon.json", "daemon.json"),
        ("/etc/gpufleet/secrets/chat.key", "chat.key"),
        ("/etc/systemd/system/gpufleet-chat.service", "gpufleet-chat.service"),
        ("/etc/gpufleet/firewall.nft", "firewall.nft"),
        ("/etc/systemd/system/gpufleet-firewall.service", "gpufleet-firewall.service"),
        ("/etc/gpufleet/host.json", "host.json"),
        ("/srv/gpufleet/weights/tiny/.gpufleet-staged.json", "weights-record.json"),
    ):
        (REF / name).write_text(lab.ssh(host, f"cat {remote}").stdout)
    (REF / "chat.key").chmod(0o600)
    account = lab.ssh(host, "getent passwd gpufleet-chat").stdout.split(":")
    (REF / "account.json").write_text(json.dumps({"service_uid": int(account[2]), "service_gid": int(account[3])}))


def checks(state):
    """The testinfra suite any fleet is checked with, on these hosts: (passed, failed) and the tail of
    its report."""
    hosts = ",".join(f"ssh://{host['name']}" for host in state["hosts"])
    done = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "tests/checks",
            f"--hosts={hosts}",
            f"--ssh-config={lab.SSH_CONFIG}",
            "--sudo",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|error)", done.stdout)}
    return counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0), done.stdout[-2000:]


def one(variant, count, log):
    """Fresh hosts, then the variant's first run, its no-op run and the checks."""
    state = lab.up(count=count, airgapped=0, proxmox=0, fresh=True, log=lambda *_: None)
    if variant == "gpufleet":
        run, changes = (lambda: pyinfra()), (lambda out: (pyinfra_changes(out), 0))
    else:
        tuned, mitogen = ANSIBLE[variant]
        run, changes = (lambda: ansible(state, max(count, 5), tuned, mitogen)), ansible_changes
    cell = {}
    cell["first_s"], cell["first_mib"], first = run()
    cell["noop_s"], cell["noop_mib"], noop = run()
    (OUT / f"{variant}-{count}-first.log").write_text(first.stdout)
    (OUT / f"{variant}-{count}-noop.log").write_text(noop.stdout)
    cell["noop_changes"], failed = changes(noop.stdout)
    if first.returncode or noop.returncode or failed:
        raise RuntimeError(f"{variant} failed on {count} host(s):\n{(first.stdout + noop.stdout)[-3000:]}")
    cell["checks_passed"], cell["checks_failed"], report = checks(state)
    if cell["checks_failed"] or not cell["checks_passed"]:
        (OUT / f"{variant}-{count}-checks.log").write_text(report)
        log(f"fleet {count} {variant}: the checks failed ({cell['checks_failed']}): its times do not count")
    if variant == "gpufleet":
        save_reference(state)
    log(
        f"fleet {count} {variant}: first {cell['first_s']:.1f}s, no-op {cell['noop_s']:.1f}s, "
        f"checks {cell['checks_passed']} passed / {cell['checks_failed']} failed"
    )
    return cell


def measure(sizes, variants=VARIANTS, log=print):
    """gpufleet first on each size (its converged host gives the playbook the files it writes)."""
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for count in sizes:
            rows.append(
                {
                    "hosts": count,
                    **{
                        variant: one(variant, count, log)
                        for variant in ("gpufleet", *[v for v in variants if v != "gpufleet"])
                    },
                }
            )
    finally:
        shutil.rmtree(REF, ignore_errors=True)  # holds a copy of the lab's API key
    return rows
