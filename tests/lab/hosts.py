"""Start, inspect and remove lab hosts: systemd-booted containers reached over SSH on loopback."""

import json
import os
import secrets
import shlex
import subprocess
import time
from pathlib import Path

from operations.core.settings import DEFAULTS
from tests.fixtures import proxmox_double, running_kernel, ubuntu_double
from tests.fixtures.nvidia_toolkit_double import build as toolkit_double

from . import bundle as lab_bundle
from . import image

LABEL = "gpufleet.lab"
# Lab hosts reached the way most real fleets are: as a sudo user, root's SSH login disabled.
SUDO_HOSTS = ("lab-1", "lab-gap-1")
SUDO_USER = "gpufleet"
# Also on every host, for the tests of logins: a user whose sudo asks for a password (kept in
# .lab/secrets/sudo-password) and one with no sudo at all.
PASSWORD_SUDO_USER = "gpufleet-pw"
NO_SUDO_USER = "nosudo"
# Lab hosts that run a Debian kernel (the uname double names the kernel Debian's archive ships now),
# so DKMS builds the NVIDIA module for real against that kernel's real headers.
DEBIAN_KERNEL_HOSTS = ("lab-2",)
LAB_NETWORK = "gpufleet-lab"
GAP_NETWORK = "gpufleet-gap"
GAP_BRIDGE = "gfl-gap0"
REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("GPUFLEET_LAB_DIR", REPO / ".lab"))
STATE_FILE = STATE_DIR / "lab.json"
KEY_FILE = STATE_DIR / "id_ed25519"
SSH_CONFIG = STATE_DIR / "ssh_config"
SUDO_PASSWORD_FILE = STATE_DIR / "secrets" / "sudo-password"

# Run in each host at start (as root, through docker exec): the lab's login users, and for a
# sudo host, root's SSH login turned off as Ubuntu cloud images and hardened servers have it.
LOGINS = r"""
set -eu
key=$(cat)
add() {{  # user, sudoers line or nothing
  id "$1" >/dev/null 2>&1 || useradd -m -s /bin/bash "$1"
  install -d -m 700 -o "$1" -g "$1" "/home/$1/.ssh"
  printf '%s\n' "$key" > "/home/$1/.ssh/authorized_keys"
  chown "$1:$1" "/home/$1/.ssh/authorized_keys"; chmod 600 "/home/$1/.ssh/authorized_keys"
  [ -z "$2" ] || {{ printf '%s\n' "$2" > "/etc/sudoers.d/$1"; chmod 440 "/etc/sudoers.d/$1"; }}
}}
add {sudo_user} '{sudo_user} ALL=(ALL) NOPASSWD:ALL'
add {password_user} '{password_user} ALL=(ALL) ALL'
printf '%s:%s\n' {password_user} '{password}' | chpasswd
add {no_sudo_user} ''
if [ "{root_login}" = yes ]; then
  install -d -m 700 /root/.ssh; printf '%s\n' "$key" > /root/.ssh/authorized_keys; chmod 600 /root/.ssh/authorized_keys
  rm -f /etc/ssh/sshd_config.d/gpufleet-lab.conf
else
  rm -f /root/.ssh/authorized_keys
  printf 'PermitRootLogin no\n' > /etc/ssh/sshd_config.d/gpufleet-lab.conf
fi
systemctl reload ssh 2>/dev/null || true
"""

# The flags measured to boot systemd here (shared/LAB.md); --privileged fails on this engine.
BOOT_FLAGS = [
    "--cap-add",
    "ALL",
    "--cap-drop",
    "SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs",
    "/run",
    "--tmpfs",
    "/run/lock",
    "--stop-signal",
    "SIGRTMIN+3",
]

# The air gap: nothing from the gap bridge is forwarded anywhere else, and the control node
# accepts only replies from it. Removed exactly, rule by rule, on teardown.
GAP_RULES = [
    ["DOCKER-USER", "-i", GAP_BRIDGE, "!", "-o", GAP_BRIDGE, "-j", "DROP"],
    ["INPUT", "-i", GAP_BRIDGE, "-j", "DROP"],
    ["INPUT", "-i", GAP_BRIDGE, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
]


def docker(*args, check=True, capture=True):
    result = subprocess.run(
        ["docker", *args], check=False, text=True, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip() if capture else ""


def load_state():
    if STATE_FILE.exists():
        return json.loads(STATE_FILE.read_text())
    return {"hosts": []}


def save_state(state):
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    lines = []
    for host in state["hosts"]:
        lines += [
            f"Host {host['name']}",
            "  HostName 127.0.0.1",
            f"  Port {host['port']}",
            f"  User {host['user']}",
            f"  IdentityFile {KEY_FILE}",
            "  IdentitiesOnly yes",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  LogLevel ERROR",
            "  ControlMaster auto",  # one connection per host for testinfra and the tests' ssh calls
            "  ControlPath /tmp/gpufleet-ssh-%C",
            "  ControlPersist 60",
            "",
        ]
    SSH_CONFIG.write_text("\n".join(lines))


def ensure_key():
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    if not KEY_FILE.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpufleet-lab", "-f", str(KEY_FILE)], check=True
        )
    return KEY_FILE.with_suffix(".pub").read_text()


def _iptables_has(rule):
    chain, *spec = rule
    return subprocess.run(["iptables", "-C", chain, *spec], stderr=subprocess.DEVNULL).returncode == 0


def ensure_networks(airgapped):
    existing = set(docker("network", "ls", "--format", "{{.Name}}").split())
    if LAB_NETWORK not in existing:
        docker("network", "create", "--label", LABEL, LAB_NETWORK)
    if airgapped and GAP_NETWORK not in existing:
        docker("network", "create", "--label", LABEL, "-o", f"com.docker.network.bridge.name={GAP_BRIDGE}", GAP_NETWORK)
    if airgapped:
        for rule in GAP_RULES:  # inserted in order, so the ACCEPT ends up above the DROP
            if not _iptables_has(rule):
                subprocess.run(["iptables", "-I", *rule], check=True)


def remove_gap_rules():
    for rule in GAP_RULES:
        while _iptables_has(rule):
            subprocess.run(["iptables", "-D", *rule], check=True)


def sudo_password():
    """The lab's password for the password-sudo user (made once, root-only on the control node)."""
    _secret(SUDO_PASSWORD_FILE)
    return SUDO_PASSWORD_FILE.read_text().strip()


def provision_logins(host, pubkey):
    """Give a started host the lab's login users; a sudo host gets root's SSH login turned off."""
    script = LOGINS.format(
        sudo_user=SUDO_USER,
        password_user=PASSWORD_SUDO_USER,
        no_sudo_user=NO_SUDO_USER,
        password=sudo_password(),
        root_login="no" if host["user"] != "root" else "yes",
    )
    subprocess.run(
        ["docker", "exec", "-i", host["container"], "sh", "-c", script],
        input=pubkey,
        text=True,
        check=True,
        capture_output=True,
    )


def start_host(name, tag, pubkey, airgapped=False):
    container = f"gpufleet-{name}"
    # A new host starts bare: no container and no Docker volume of that name left by another lab
    # (another checkout's, whose state file this one does not know).
    remove_host({"container": container})
    docker(
        "run",
        "-d",
        "--name",
        container,
        "--hostname",
        name,
        "--label",
        LABEL,
        *BOOT_FLAGS,
        "-v",
        f"{container}-docker:/var/lib/docker",
        "--network",
        GAP_NETWORK if airgapped else LAB_NETWORK,
        "-p",
        "127.0.0.1::22",
        tag,
        "/sbin/init",
    )
    port = int(docker("port", container, "22/tcp").splitlines()[0].rsplit(":", 1)[1])
    network = GAP_NETWORK if airgapped else LAB_NETWORK
    address = docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}', container)
    return {
        "name": name,
        "container": container,
        "port": port,
        "address": address,
        "airgapped": airgapped,
        "user": SUDO_USER if name in SUDO_HOSTS else "root",
        "role": "site" if name.startswith("lab-svc-") else "deploy",
    }


def wait_booted(host, pubkey, timeout=120):
    """Wait until systemd says running (or degraded), give the host its logins, and wait for sshd."""
    deadline = time.time() + timeout
    state, provisioned = "", False
    while time.time() < deadline:
        state = docker("exec", host["container"], "systemctl", "is-system-running", check=False)
        if state in ("running", "degraded"):
            if not provisioned:
                provision_logins(host, pubkey)
                provisioned = True
            if ssh(host, "true", check=False).returncode == 0:
                return state
        time.sleep(0.5)
    raise RuntimeError(f"{host['name']}: not booted after {timeout}s (systemd says {state!r})")


def ssh(host, command, check=True, user=None, **kwargs):
    """Run ``command`` as root on a lab host over SSH: through sudo, since the login may be a sudo
    user (a root login's sudo asks nothing). ``user`` logs in as another lab user, without sudo."""
    target = [host["name"], command] if user else [host["name"], "sudo -n sh -c " + shlex.quote(command)]
    login = ["-l", user] if user else []
    return subprocess.run(
        ["ssh", "-F", str(SSH_CONFIG), "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", *login, *target],
        check=check,
        text=True,
        capture_output=True,
        **kwargs,
    )


def _secret(path):
    """A random secret for the lab (an API key, a sudo password), root-only on the control node too."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)


def prepare(log=print):
    """What the lab's hosts are made from, built or found cached: the host image, the toolkit doubles'
    packages and the offline bundle with its images (minutes when cold). Returns the host image's tag."""
    tag = image.ensure_image(log=log)
    toolkit_double.build(STATE_DIR / "toolkit-repo")
    lab_bundle.build(log=log)
    return tag


def up(count=3, airgapped=1, proxmox=1, connected=0, ubuntu=0, fresh=False, log=print):
    """
    Bring the lab to `count` connected hosts, `airgapped` air-gapped hosts, `proxmox` pairs of a
    Proxmox VE host double (lab-pve-N) with its LXC guest (lab-ct-N, VMID 101), and `connected`
    hosts deployed with no bundle (lab-net-N) from the site services on lab-svc-1 (a registry and a
    hub, tests/lab/site.py), and `ubuntu` Ubuntu-shaped hosts (lab-ubu-N, tests/fixtures/ubuntu_double)
    (new ones if `fresh`).
    """
    from . import site  # it reads this module's paths

    started = time.time()
    tag = prepare(log=log)
    pubkey = ensure_key()
    _secret(STATE_DIR / "secrets" / "chat-api-key")
    _secret(STATE_DIR / "secrets" / "rag-admin-password")
    ensure_networks(airgapped > 0)
    state = load_state()
    wanted = [(f"lab-{i}", False) for i in range(1, count + 1)]
    wanted += [(f"lab-gap-{i}", True) for i in range(1, airgapped + 1)]
    for i in range(1, proxmox + 1):
        wanted += [(f"lab-pve-{i}", False), (f"lab-ct-{i}", False)]
    if connected:
        wanted += [("lab-svc-1", False)] + [(f"lab-net-{i}", False) for i in range(1, connected + 1)]
    wanted += [(f"lab-ubu-{i}", False) for i in range(1, ubuntu + 1)]
    running = set(docker("ps", "--filter", f"label={LABEL}", "--format", "{{.Names}}").split())
    known = {h["name"]: h for h in state["hosts"]}
    hosts = []
    for name, gapped in wanted:
        host = known.get(name)
        if host and not fresh and host["container"] in running and host.get("image") == tag and "role" in host:
            hosts.append(host)
            continue
        if host:
            remove_host(host)
        host = start_host(name, tag, pubkey, airgapped=gapped)
        host["image"] = tag
        hosts.append(host)
    for host in state["hosts"]:
        if host["name"] not in {h["name"] for h in hosts}:
            remove_host(host)
    state["hosts"] = hosts
    save_state(state)
    for host in hosts:
        wait_booted(host, pubkey)
        if host["name"].startswith("lab-pve-"):
            proxmox_double.install(host["container"], DEFAULTS["nvidia_driver_version"])
        if host["role"] == "site":
            site.install(host, log=log)
        if host["name"] in DEBIAN_KERNEL_HOSTS:
            running_kernel.install(host["container"], running_kernel.debian_abi(host["container"]))
        if host["name"].startswith("lab-ubu-"):
            ubuntu_double.install(host["container"])
    log(f"lab up: {len(hosts)} hosts in {time.time() - started:.1f}s")
    return state


def remove_host(host):
    docker("rm", "-f", "-v", host["container"], check=False)
    docker("volume", "rm", f"{host['container']}-docker", check=False)


def down(log=print):
    """Remove every lab container, volume, network and firewall rule, and the control node's trust in
    the lab registry's CA."""
    from . import site

    for container in docker("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}").split():
        remove_host({"container": container})
    for network in docker("network", "ls", "--filter", f"label={LABEL}", "--format", "{{.Name}}").split():
        docker("network", "rm", network, check=False)
    remove_gap_rules()
    site.remove_control_node_trust()
    if STATE_FILE.exists():
        STATE_FILE.unlink()
    log("lab down")


def deployed(state=None):
    """The lab hosts gpufleet deploys (not the site services host)."""
    return [host for host in (state or load_state())["hosts"] if host.get("role", "deploy") == "deploy"]


def status():
    state = load_state()
    rows = []
    for host in state["hosts"]:
        running = docker("inspect", "-f", "{{.State.Running}}", host["container"], check=False) == "true"
        system = (
            docker("exec", host["container"], "systemctl", "is-system-running", check=False) if running else "stopped"
        )
        rows.append({**host, "state": system})
    return rows
