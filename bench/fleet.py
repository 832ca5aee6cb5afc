"""Fleet convergence: deploy.py against an Ansible playbook of the same steps, first run and no-op
re-run, on fresh lab hosts of each size."""

import json
import os
import re
import shutil
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
        lines.append(f"{host['name']} ansible_host=127.0.0.1 ansible_port={host['port']} ansible_user=root "
                     f"ansible_ssh_private_key_file={lab.KEY_FILE}")
    path = OUT / "ansible-inventory.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def ansible(state, forks):
    manifest = json.loads((lab.STATE_DIR / "bundle" / "manifest.json").read_text())
    image = manifest["images"][0]
    extra = {"bundle_dir": str(lab.STATE_DIR / "bundle"), "ref_dir": str(REF), "repo_dir": str(REPO),
             "image_tag": image["name"], "image_file": image["file"]}
    return procmem.run([str(BIN / "ansible-playbook"), "-i", str(ansible_inventory(state)), "-f", str(forks),
                        "-e", json.dumps(extra), "bench/ansible/site.yml"], cwd=REPO,
                       env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "bench/ansible/ansible.cfg")})


def ansible_changes(output):
    counts = [int(n) for n in re.findall(r"changed=(\d+)", output)]
    failed = sum(int(n) for n in re.findall(r"(?:failed|unreachable)=(\d+)", output))
    return (sum(counts) if counts else None), failed


def save_reference(state):
    """Files gpufleet computed on a converged host, for the playbook to write identically."""
    REF.mkdir(parents=True, exist_ok=True)
    host = state["hosts"][0]
    for remote, name in (("/etc/docker/daemon.json", "daemon.json"), ("/etc/gpufleet/secrets/chat.env", "chat.env"),
                         ("/etc/systemd/system/gpufleet-chat.service", "gpufleet-chat.service"),
                         ("/etc/gpufleet/host.json", "host.json"),
                         ("/srv/gpufleet/weights/tiny/.gpufleet-staged.json", "weights-record.json")):
        (REF / name).write_text(lab.ssh(host, f"cat {remote}").stdout)
    (REF / "chat.env").chmod(0o600)


def measure(sizes, log=print):
    rows = []
    for count in sizes:
        row = {"hosts": count}
        state = lab.up(count=count, airgapped=0, proxmox=0, fresh=True, log=lambda *_: None)
        row["pyinfra_first_s"], row["pyinfra_first_mib"], first = pyinfra()
        row["pyinfra_noop_s"], row["pyinfra_noop_mib"], noop = pyinfra()
        if first.returncode or noop.returncode:
            raise RuntimeError(f"pyinfra failed on {count} host(s):\n{(first.stdout + noop.stdout)[-3000:]}")
        row["pyinfra_noop_changes"] = pyinfra_changes(noop.stdout)
        save_reference(state)
        state = lab.up(count=count, airgapped=0, proxmox=0, fresh=True, log=lambda *_: None)
        row["ansible_first_s"], row["ansible_first_mib"], first = ansible(state, forks=max(count, 5))
        row["ansible_noop_s"], row["ansible_noop_mib"], noop = ansible(state, forks=max(count, 5))
        (OUT / f"ansible-{count}-first.log").write_text(first.stdout)
        (OUT / f"ansible-{count}-noop.log").write_text(noop.stdout)
        row["ansible_noop_changes"], failed = ansible_changes(noop.stdout)
        if first.returncode or noop.returncode or failed:
            raise RuntimeError(f"ansible failed on {count} host(s):\n{(first.stdout + noop.stdout)[-3000:]}")
        log(f"fleet {count}: pyinfra {row['pyinfra_first_s']:.1f}s / {row['pyinfra_noop_s']:.1f}s, "
            f"ansible {row['ansible_first_s']:.1f}s / {row['ansible_noop_s']:.1f}s")
        rows.append(row)
    shutil.rmtree(REF, ignore_errors=True)  # holds a copy of the lab's API key
    return rows
