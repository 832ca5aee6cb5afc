"""
Fan-out inside a site: a host pulls its staged files from a seed host of the run (which staged
them from the control node first) over a one-run SSH key limited to ``gpufleet-relay-send``.
"""

import posixpath
import secrets
import shlex

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pyinfra import host, inventory, logger
from pyinfra.api import FactBase, deploy, operation
from pyinfra.api.exceptions import OperationError
from pyinfra.operations import files, server

from operations import TEMPLATES, TOOLS_DIR
from operations.core import checks, settings
from operations.core.errors import ConfigError
from operations.core.remote import HostFunction, Shell
from operations.offline.staging.facts import FreeSpace, StagedFiles, plan, room_shortfall
from operations.offline.staging.wire import check_stream, mark_content, receive_command, write_record

RELAY_SENDER = f"{TOOLS_DIR}/gpufleet-relay-send"
RELAY_LOCK = "~/.ssh/.gpufleet-relay.lock"


def pullers(seed):
    """The hosts of this run that stage from ``seed`` (``gpufleet_stage_via``)."""
    return [
        other
        for other in inventory.iter_activated_hosts()
        if other.name != seed.name and other.data.get("gpufleet_stage_via") == seed.name
    ]


def relay_seed(target=None):
    """
    The host ``target`` pulls its staged files from (``gpufleet_stage_via``), or None: from the
    control node. A seed names itself, or nothing; one missing from the run is refused.
    """
    target = target or host
    name = target.data.get("gpufleet_stage_via")
    if not name or name == target.name:
        return None
    seed = inventory.get_host(name, default=None)
    if seed is None:
        raise ConfigError("gpufleet_stage_via", f"{name!r} is not a host of the inventory", host=target.name)
    if not seed.connected:
        raise ConfigError(
            "gpufleet_stage_via",
            f"{name} is not in this run (--limit?): this host pulls its "
            "staged files from it, so both are deployed together",
            host=target.name,
        )
    if seed.data.get("gpufleet_stage_via") not in (None, seed.name):
        raise ConfigError(
            "gpufleet_stage_via",
            f"{name} pulls from {seed.data.gpufleet_stage_via} itself: name a seed that stages from the control node",
            host=target.name,
        )
    return seed


class RelayKeysLeft(FactBase):
    """
    Returns the login's ``authorized_keys`` and how many relay key lines it holds: none once runs
    end, since each pull removes its own; any found at a run's start were left by a run that was
    killed mid-pull (they expire within the hour regardless).

    .. code:: python

        {"path": "/home/ops/.ssh/authorized_keys", "count": 0}
    """

    def command(self, user):
        return (
            f'f=$(getent passwd {shlex.quote(user)} | cut -d: -f6)/.ssh/authorized_keys; echo "$f"; '
            "grep -c ' gpufleet-relay-[^ ]*$' \"$f\" 2>/dev/null || true"
        )

    def process(self, output):
        return {"path": output[0], "count": int(output[-1]) if len(output) > 1 and output[-1].isdigit() else 0}


@deploy("Serve staged files to the site", data_defaults=settings.DEFAULTS)
def serve_relays():
    """On a seed (a host some other host names in ``gpufleet_stage_via``): remove relay keys an
    interrupted run left in the login's ``authorized_keys``, and install the relay sender."""
    if any(
        other.data.get("gpufleet_stage_via") == host.name
        for other in inventory.iter_activated_hosts()
        if other is not host
    ):
        left = host.get_fact(RelayKeysLeft, user=host.data.get("ssh_user") or "root")
        if left["count"]:
            keys = shlex.quote(left["path"])
            lock = shlex.quote(posixpath.join(posixpath.dirname(left["path"]), ".gpufleet-relay.lock"))
            # sed -i keeps the file's owner and mode (GNU sed, run as root); the lock is the pulls' own
            server.shell(
                name=f"Remove {left['count']} relay key(s) an interrupted run left in {left['path']}",
                commands=[f"flock {lock} sed -i '/ gpufleet-relay-[^ ]*$/d' {keys}"],
            )
        files.put(
            name=f"Install the relay sender {RELAY_SENDER}",
            src=str(TEMPLATES / "gpufleet-relay-send"),
            dest=RELAY_SENDER,
            mode="755",
            user="root",
            group="root",
        )


def relay_key():
    """A one-run Ed25519 key pair: (OpenSSH private key bytes, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    return private, key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def authorized_line(public, marker, expiry):
    """The seed's authorized_keys line: only the relay sender, no forwarding or pty, until ``expiry``
    (YYYYMMDDHHMM, the seed's local time: sshd reads it so)."""
    return f'restrict,command="{RELAY_SENDER}",expiry-time="{expiry}" {public} {marker}'


def pull_from_seed(state, host, shell, seed, keys_dir, dest, wanted, send, mode):
    """Run on the host's connection: pull ``send`` from the seed over a one-run key, verify, record.

    The key's public half goes into the seed's login user's own ``authorized_keys`` (edited as that
    user: the account gpufleet already reaches the seed with); the private half and the seed's host
    key live in ``keys_dir`` on the pulling host (root only, written through its privilege wrapper).
    """
    seed_shell = Shell.of(state, seed)
    seed_login = seed_shell.login()
    address = seed.data.get("gpufleet_site_address") or seed.data.get("ssh_hostname") or seed.name
    port = seed.data.get("gpufleet_site_port") or 22
    key_type, host_key = seed_shell.run("cat /etc/ssh/ssh_host_ed25519_key.pub")[0].split()[:2]
    marker = f"gpufleet-relay-{host.name}-{secrets.token_hex(6)}"
    private, public = relay_key()
    keys = posixpath.join(keys_dir, marker)
    expiry = seed_login.run(
        "umask 077 && mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && date -d '+1 hour' +%Y%m%d%H%M"
    )[0]
    try:
        # Hosts pulling at once edit the seed's authorized_keys under one lock: no line is lost.
        seed_login.send(
            f"flock {RELAY_LOCK} sh -c 'cat >> ~/.ssh/authorized_keys'", authorized_line(public, marker, expiry) + "\n"
        )
        shell.send(f"umask 077 && mkdir -p {shlex.quote(keys_dir)} && cat > {keys}", private)
        known = address if port == 22 else f"[{address}]:{port}"
        shell.send(f"umask 077 && cat > {keys}.known", f"{known} {key_type} {host_key}\n")
        plan = "".join(
            f"{offset} {wanted[path]['size']} {wanted[path]['sha256']} {path}\n"
            for path, offset in sorted(send.items())
        )
        pull = (
            f"ssh -i {keys} -o BatchMode=yes -o IdentitiesOnly=yes -o UserKnownHostsFile={keys}.known "
            f"-o StrictHostKeyChecking=yes -p {port} {shlex.quote(seed.data.get('ssh_user') or 'root')}@"
            f"{shlex.quote(address)} {shlex.quote(dest)} | {receive_command(dest, mode)}"
        )
        status, lines, stderr = shell.stream(pull, [plan.encode()])
    finally:
        seed_login.run(f"flock {RELAY_LOCK} sed -i '/ {marker}$/d' ~/.ssh/authorized_keys")
        shell.run(f"rm -f {keys} {keys}.known")
    size = sum(wanted[path]["size"] - offset for path, offset in send.items())
    check_stream(host, dest, status, lines, len(send), stderr, f"up to {size}")
    write_record(shell, dest, wanted)
    mark_content(host.name, dest, send)
    logger.info(f"[{host.name}] relayed {len(send)} file(s), {size} bytes, from {seed.name} into {dest}")


def pull_recorded(state, host, shell, seed, dest, keys_dir, margin, mode, only=None):
    """
    Run on the host's connection: pull what the seed's staged record of ``dest`` lists (``only``
    these paths when given), the record read now, once the seed's own operations of this run are
    done; resumable and verified as any relay. Returns ``(wanted, staged)``: path -> ``{size,
    sha256}``, and what ``dest`` held here before.
    """
    facts = StagedFiles()
    record = facts.process(Shell.of(state, seed).run(facts.command(dest)))["record"]
    wanted = {path: {"size": e[0], "sha256": e[2]} for path, e in record.items() if only is None or path in only}
    missing = sorted(set(only or ()) - set(wanted)) or ([] if wanted else [dest])
    if missing:
        raise OSError(f"{host.name}: {seed.name} holds no {', '.join(missing)} in {dest} to relay")
    shell.run(f"mkdir -p {shlex.quote(dest)}")
    staged = facts.process(shell.run(facts.command(dest)))
    _, check, send = plan(wanted, staged)
    send.update(dict.fromkeys(check, 0))
    needed = sum(wanted[path]["size"] - offset for path, offset in send.items())
    space = FreeSpace()
    shortfall = room_shortfall(host.name, dest, needed, space.process(shell.run(space.command(dest))), margin)
    if shortfall:
        raise OSError(shortfall)
    if send:
        pull_from_seed(state, host, shell, seed, keys_dir, dest, wanted, send, mode)
    else:
        mark_content(host.name, dest, {})  # nothing moved: no service restarts for it
    return wanted, staged


@operation(is_idempotent=False)
def seed_ready(what: str, seed: str):
    """
    A step every host of a seed's site passes, changing nothing: pyinfra orders each host's steps,
    and a step they share orders the seed's own work on ``what`` (before it there) before any host's
    pull of it (after it there).

    + what: what the seed provides, as the run says it
    + seed: the seed's name
    """
    host.noop(f"{what}: {'provided here for the site' if host.name == seed else f'from {seed}'}")
    yield from ()


@operation()
def relayed(seed: str, dest: str, files: dict, mode: str = "444"):
    """
    Make ``dest`` on the host hold ``files``, pulled over the site's network from ``seed``, which
    staged them from the control node in an earlier operation of this run.

    + seed: the seed host (in this run); it serves ``dest`` through ``gpufleet-relay-send`` to a
      key that exists for this transfer only (removed after, expiring within the hour regardless)
    + dest: the directory on both hosts
    + files: path -> ``{"size": int, "sha256": str}``; fresh copies are hashed on the host
    + mode: file mode on the host
    """
    current = host.get_fact(StagedFiles, path=dest)
    intact, check, send = plan(files, current)
    send.update(dict.fromkeys(check, 0))  # a right-sized file without a record is pulled again whole
    if not send and not set(current["record"]) - set(files):
        host.noop(f"{dest}: {len(intact)} files intact")
        return
    size = sum(files[path]["size"] - offset for path, offset in send.items())
    shortfall = room_shortfall(
        host.name,
        dest,
        size,
        host.get_fact(FreeSpace, path=dest),
        checks.size_bytes(host.data.gpufleet_free_space_margin),
    )
    if shortfall:
        raise OperationError(shortfall)
    keys_dir = posixpath.join(host.data.gpufleet_state_dir, "relay")
    yield f"mkdir -p {shlex.quote(dest)} && rm -f {shlex.quote(keys_dir)}/gpufleet-relay-*"  # an interrupted run's
    logger.info(f"[{host.name}] {dest}: {len(intact)} intact, {len(send)} to pull from {seed.name}")
    yield HostFunction(pull_from_seed, [seed, keys_dir, dest, files, dict(send), mode], {})
