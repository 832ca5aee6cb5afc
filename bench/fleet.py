"""Fleet convergence: deploy.py against an Ansible playbook of the same steps, first run and no-op
re-run, on fresh lab hosts of each size, per variant: the naive playbook (directories with
`copy`), the tuned one (ansible.posix.synchronize, pipelining, ControlPersist, forks ≥ hosts, no
fact gathering) and the tuned one under Mitogen's strategy. Each cell is sampled several times,
the variants' order rotated from one round to the next (the machine drifts over an hour); a
variant's times count only when the hosts it converged give every testinfra check (tests/checks)
the outcome gpufleet's give it, check by check, in every sample."""

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tests.lab import hosts as lab

from . import procmem, record

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = REPO / "bench" / "out"
REF = OUT / "ansible-ref"


# what each host's last run asked (operations/core/fact_batch.py), kept apart from the user's own and
# forgotten with each set of fresh hosts: a first run starts with none, as a user's does
FACTS = OUT / "facts"


def pyinfra(*args):
    env = {**os.environ, "GPUFLEET_FACT_CACHE": str(FACTS)}
    return procmem.run([str(BIN / "pyinfra"), "-y", "inventories/lab.py", "deploy.py", *args], cwd=REPO, env=env)


def fresh_hosts(count):
    """``count`` fresh lab hosts (the lab's lighter recipe: no air-gapped or Proxmox ones), no record of
    their facts."""
    shutil.rmtree(FACTS, ignore_errors=True)
    return lab.up(count=count, airgapped=0, proxmox=0, fresh=True, log=lambda *_: None)


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
        ("/etc/systemd/system/nvidia-persistenced.service.d/gpufleet.conf", "persistenced.conf"),
        ("/etc/systemd/system/nftables.service.d/gpufleet.conf", "nftables-dropin.conf"),
        ("/srv/gpufleet/weights/tiny/.gpufleet-staged.json", "weights-record.json"),
    ):
        (REF / name).write_text(lab.ssh(host, f"cat {remote}").stdout)
    (REF / "chat.key").chmod(0o600)
    # The playbook writes the site's own daemon.json keys; the runtime is nvidia-ctk's to add there.
    daemon = json.loads((REF / "daemon.json").read_text())
    daemon.pop("runtimes", None)
    (REF / "daemon-base.json").write_text(json.dumps(daemon))
    account = lab.ssh(host, "getent passwd gpufleet-chat").stdout.split(":")
    (REF / "account.json").write_text(json.dumps({"service_uid": int(account[2]), "service_gid": int(account[3])}))


def checks(state):
    """The testinfra suite any fleet is checked with, on these hosts: each check's outcome by its id
    (``{"test_file.py::test_name[ssh://host]": "passed" | "skipped" | "failed"}``) and the tail of
    its report."""
    hosts = ",".join(f"ssh://{host['name']}" for host in state["hosts"])
    junit = OUT / "checks.xml"
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
            f"--junitxml={junit}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    outcomes = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        outcomes[f"{case.get('classname').rsplit('.', 1)[-1]}.py::{case.get('name')}"] = outcome
    return outcomes, done.stdout[-2000:]


def counts(outcomes):
    return {
        kind: sum(1 for outcome in outcomes.values() if outcome == kind) for kind in ("passed", "skipped", "failed")
    }


def one(variant, count, log):
    """Fresh hosts, then the variant's first run, its no-op run and the checks: one sample."""
    state = fresh_hosts(count)
    if variant == "gpufleet":
        run, changes = (lambda: pyinfra()), (lambda out: (pyinfra_changes(out), 0))
    else:
        tuned, mitogen = ANSIBLE[variant]
        run, changes = (lambda: ansible(state, max(count, 5), tuned, mitogen)), ansible_changes
    sample = {}
    sample["first_s"], sample["first_mib"], first = run()
    sample["noop_s"], sample["noop_mib"], noop = run()
    (OUT / f"{variant}-{count}-first.log").write_text(first.stdout)
    (OUT / f"{variant}-{count}-noop.log").write_text(noop.stdout)
    sample["noop_changes"], failed = changes(noop.stdout)
    if first.returncode or noop.returncode or failed:
        raise RuntimeError(f"{variant} failed on {count} host(s):\n{(first.stdout + noop.stdout)[-3000:]}")
    sample["outcomes"], report = checks(state)
    if counts(sample["outcomes"])["failed"]:
        (OUT / f"{variant}-{count}-checks.log").write_text(report)
    if variant == "gpufleet" and not REF.exists():
        save_reference(state)
    log(
        f"fleet {count} {variant}: first {sample['first_s']:.1f}s, no-op {sample['noop_s']:.1f}s, "
        f"checks {counts(sample['outcomes'])}"
    )
    return sample


def cell(samples, reference):
    """A variant's samples on one size, summed up; ``reference``: gpufleet's checks' outcomes. Its
    times count only when every sample's checks match the reference's, check by check."""
    differ = sorted(
        {
            f"{check}: {sample['outcomes'].get(check, 'absent')} (gpufleet: {reference.get(check, 'absent')})"
            for sample in samples
            for check in set(sample["outcomes"]) | set(reference)
            if sample["outcomes"].get(check) != reference.get(check)
        }
    )
    return {
        "first_s": record.spread([s["first_s"] for s in samples]),
        "noop_s": record.spread([s["noop_s"] for s in samples]),
        "first_mib": max(s["first_mib"] for s in samples),
        "noop_mib": max(s["noop_mib"] for s in samples),
        "noop_changes": max(s["noop_changes"] for s in samples),
        "checks": counts(samples[0]["outcomes"]),
        "checks_differ_from_gpufleet": differ,
        "counts": not differ and not counts(reference)["failed"],
    }


def measure(sizes, variants=VARIANTS, samples=3, log=print):
    """Each size: ``samples`` rounds of every variant on fresh hosts, the order rotated each round;
    gpufleet goes first in the first round (its converged host gives the playbook the files it
    writes)."""
    OUT.mkdir(parents=True, exist_ok=True)
    variants = ["gpufleet", *[v for v in variants if v != "gpufleet"]]
    rows = []
    try:
        for count in sizes:
            shutil.rmtree(REF, ignore_errors=True)  # this size's gpufleet host gives the files
            taken, orders = {variant: [] for variant in variants}, []
            for round_ in range(samples):
                order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
                orders.append(order)
                for variant in order:
                    taken[variant].append(one(variant, count, log))
            reference = taken["gpufleet"][0]["outcomes"]
            rows.append(
                {
                    "hosts": count,
                    "orders": orders,
                    "checks": {"gpufleet": reference},
                    **{variant: cell(taken[variant], reference) for variant in variants},
                }
            )
    finally:
        shutil.rmtree(REF, ignore_errors=True)  # holds a copy of the lab's API key
    return rows
