"""
Stage files from the control node onto hosts over pyinfra's own SSH connection: resumable,
verified with SHA-256, and skipped in constant time when already there and intact.

All files for a host go in one stream on one SSH channel (no round trip per file). A fresh copy
is hashed by the sender as it reads it (SSH's MAC covers the way, the host checks the size); a
resumed copy, or a file found at the right size without a record, is hashed whole on the host.

On the host, each staged directory keeps ``.gpufleet-staged.json``: path -> [size, mtime, sha256]
of the files verified there. A file whose size and mtime still match its record is intact
without being read; anything else is hashed again (or sent again). An interrupted copy leaves
``<file>.gpufleet-part``; the next run appends to it instead of starting over.
"""

import hashlib
import json
import posixpath
import secrets
import shlex

import gevent
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pyinfra import host, inventory, logger
from pyinfra.api import FactBase, deploy, operation
from pyinfra.operations import files

from . import TEMPLATES, TOOLS_DIR, config
from .bundle import CHUNK
from .errors import ConfigError
from .remote import HostFunction, Shell

RECORD = ".gpufleet-staged.json"
PART = ".gpufleet-part"
RELAY_SENDER = f"{TOOLS_DIR}/gpufleet-relay-send"
RELAY_LOCK = "~/.ssh/.gpufleet-relay.lock"

DEFAULTS = {"gpufleet_stage_via": None, "gpufleet_site_address": None, "gpufleet_site_port": 22}

config.register({
    "gpufleet_stage_via": (config._is_str, "the name of another host in the run to pull staged files from"),
    "gpufleet_site_address": (config._is_str, "the address other hosts of the site reach this one at"),
    "gpufleet_site_port": (config._is_positive_int, "the SSH port other hosts of the site reach this one at"),
})


class StagedFiles(FactBase):
    """
    Returns what is in a staged directory: files with size and mtime, partial copies, the record.

    .. code:: python

        {"files": {"apt/x.deb": [1204, 1700000000]}, "parts": {"apt/y.deb": 4096},
         "record": {"apt/x.deb": [1204, 1700000000, "<sha256>"]}}
    """

    def default(self):
        return {"files": {}, "parts": {}, "record": {}}

    def command(self, path):
        path = shlex.quote(path)
        return (f"if [ -d {path} ]; then cd {path} && find . -type f ! -name {RECORD} -printf '%s %T@ %P\\n'; "
                f"echo '--record--'; cat {RECORD} 2>/dev/null || true; fi")

    def process(self, output):
        staged = {"files": {}, "parts": {}, "record": {}}
        lines = iter(output)
        for line in lines:
            if line == "--record--":
                try:
                    staged["record"] = json.loads("\n".join(lines) or "{}")
                except ValueError:
                    staged["record"] = {}
                break
            size, mtime, path = line.split(" ", 2)
            if path.endswith(PART):
                staged["parts"][path[: -len(PART)]] = int(size)
            else:
                staged["files"][path] = [int(size), int(float(mtime))]
        return staged


def plan(wanted, staged, rehash=False):
    """
    Split ``wanted`` (path -> {size, sha256}) by what the host holds (pure: unit-tested).

    Returns ``(intact, check, send)``: files whose record and stat match, files present at the
    right size whose content must be hashed on the host, and files to send (with resume offsets).
    """
    intact, check, send = [], [], {}
    for path, entry in sorted(wanted.items()):
        on_host = staged["files"].get(path)
        record = staged["record"].get(path)
        if (on_host and record and not rehash and record == [*on_host, entry["sha256"]]
                and on_host[0] == entry["size"]):
            intact.append(path)
        elif on_host and on_host[0] == entry["size"]:
            check.append(path)
        else:
            part = staged["parts"].get(path, 0)
            send[path] = part if part <= entry["size"] else 0
    return intact, check, send


# Runs on the host with stdin fed by ``_frames``: per file a header line
# "OFFSET COUNT TOTAL SHA256 PATH", COUNT bytes appended to PATH.gpufleet-part, then (for a fresh
# copy) a verdict line from the sender: its SHA-256, or "host" (a relay: hash it here). A resumed
# copy is hashed whole on the host. Prints "ok PATH" or "bad PATH"; a copy cut short keeps its
# part file for the next run and stops.
RECEIVE = r"""
cd "$1" || exit 1
while read -r offset count total digest path; do
  part="$path.gpufleet-part"
  case "$path" in */*) [ "${path%/*}" = "$made" ] || mkdir -p -- "${path%/*}" || exit 1; made=${path%/*};; esac
  copy="bs=1M count=$count iflag=count_bytes,fullblock status=none"
  if [ "$offset" -eq 0 ]; then
    dd of="$part" $copy || exit 1
    read -r verdict || exit 1
    [ "$verdict" != host ] || verdict=$(sha256sum < "$part")
  else
    dd of="$part" oflag=append conv=notrunc $copy || exit 1
    verdict=$(sha256sum < "$part")
  fi
  [ "$(stat -c %s -- "$part")" -eq "$total" ] || { echo "short $path"; exit 1; }
  if [ "${verdict%% *}" = "$digest" ]; then
    chmod "$2" -- "$part" && mv -f -- "$part" "$path" && echo "ok $path" || exit 1
  else
    rm -f -- "$part"; echo "bad $path"
  fi
done
"""


def _frames(src, wanted, send, counter):
    """Yield the receiver's stream; each fresh file is hashed here as it is read and sent."""
    for path, offset in sorted(send.items()):
        entry = wanted[path]
        count = entry["size"] - offset
        yield f"{offset} {count} {entry['size']} {entry['sha256']} {path}\n".encode()
        digest, hashing = hashlib.sha256(), None
        with open(f"{src}/{path}", "rb") as local:
            local.seek(offset)
            while count:
                block = local.read(min(CHUNK, count))
                if not block:
                    raise OSError(f"{src}/{path}: shorter than the manifest says (the source changed)")
                if hashing:
                    hashing.get()
                # hashlib lets go of the GIL: the block is hashed on another core while it is sent
                hashing = gevent.get_hub().threadpool.spawn(digest.update, block)
                counter[0] += len(block)
                count -= len(block)
                yield block
        if hashing:
            hashing.get()
        if not offset:
            yield f"{digest.hexdigest()}\n".encode()


def _receive_command(dest, mode):
    return f"sh -c {shlex.quote(RECEIVE)} gpufleet-receive {shlex.quote(dest)} {shlex.quote(mode)}"


def _transfer(state, host, shell, src, dest, wanted, check, send, mode):
    """Run on the host's connection: hash what may be intact, stream the rest, verify, record."""
    hashes = {}
    if check:
        quoted = " ".join(shlex.quote(path) for path in check)
        for line in shell.run(f"cd {shlex.quote(dest)} && sha256sum -- {quoted}"):
            digest, path = line.split(None, 1)
            hashes[path.lstrip("*")] = digest
    for path in check:
        if hashes.get(path) != wanted[path]["sha256"]:
            logger.warning(f"[{host.name}] {dest}/{path}: SHA-256 differs from the manifest; sending it again")
            send[path] = 0
    sent = [0]
    if send:
        status, lines, stderr = shell.stream(_receive_command(dest, mode), _frames(src, wanted, send, sent))
        _check_stream(host, dest, status, lines, len(send), stderr, sent[0])
    _write_record(shell, dest, wanted)
    logger.info(f"[{host.name}] staged {len(send)} file(s), {sent[0]} bytes sent, into {dest}")


def _write_record(shell, dest, wanted):
    """Record size, mtime and SHA-256 of the wanted files now in ``dest``: the next run trusts them."""
    facts = StagedFiles()
    on_host = facts.process(shell.run(facts.command(dest)))["files"]
    record = {path: [*stat, wanted[path]["sha256"]] for path, stat in on_host.items() if path in wanted}
    shell.send(f"cat > {shlex.quote(posixpath.join(dest, RECORD))}", json.dumps(record, sort_keys=True))


def _check_stream(host, dest, status, lines, expected, stderr, sent):
    """Raise, naming the file, when the receiver reported a damaged copy or stopped early."""
    bad = [line[4:] for line in lines if line.startswith("bad ")]
    if bad:
        raise OSError(f"{host.name}: {dest}/{bad[0]}: SHA-256 after transfer differs from the manifest "
                      "(the source changed, or the copy was damaged); removed the partial copy")
    if status or len(lines) != expected:
        raise OSError(f"{host.name}: staging into {dest} stopped ({sent} bytes sent; the next run "
                      f"resumes): {(lines or [''])[-1]} {stderr.strip()}")


@operation()
def staged(src, dest, files, mode="444", rehash=False, pulled_from=None):
    """
    Make ``dest`` on the host hold ``files`` from ``src`` on the control node, verified.

    + src: directory on the control node (a bundle, or a part of one)
    + dest: directory on the host
    + files: path below ``src`` -> ``{"size": int, "sha256": str}`` (a manifest)
    + mode: file mode on the host (read-only by default)
    + rehash: hash every file on the host, even those whose record matches
    + pulled_from: the seed this host pulls from instead (``relayed``, next): nothing to do here

    Extra files already in ``dest`` are left alone.
    """
    if pulled_from:
        host.noop(f"{dest}: pulled from {pulled_from} in the next operation")
        return
    current = host.get_fact(StagedFiles, path=dest)
    intact, check, send = plan(files, current, rehash)
    stale_record = set(current["record"]) - set(files)
    if not check and not send and not stale_record:
        host.noop(f"{dest}: {len(intact)} files intact")
        return
    yield f"mkdir -p {shlex.quote(dest)}"
    resumed = sum(1 for offset in send.values() if offset)
    size = sum(files[path]["size"] - offset for path, offset in send.items())
    logger.info(f"[{host.name}] {dest}: {len(intact)} intact, {len(check)} to verify, {len(send)} to send "
                f"({size} bytes{f', {resumed} resumed' if resumed else ''})")
    yield HostFunction(_transfer, [src, dest, files, check, dict(send), mode], {})


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
        raise ConfigError("gpufleet_stage_via", f"{name} is not in this run (--limit?): this host pulls its "
                          "staged files from it, so both are deployed together", host=target.name)
    if seed.data.get("gpufleet_stage_via") not in (None, seed.name):
        raise ConfigError("gpufleet_stage_via", f"{name} pulls from {seed.data.gpufleet_stage_via} itself: "
                          "name a seed that stages from the control node", host=target.name)
    return seed


@deploy("Serve staged files to the site", data_defaults=DEFAULTS)
def serve_relays():
    """On a seed (a host some other host names in ``gpufleet_stage_via``): install the relay sender."""
    if any(other.data.get("gpufleet_stage_via") == host.name for other in inventory.iter_activated_hosts()
           if other is not host):
        files.put(name=f"Install the relay sender {RELAY_SENDER}", src=str(TEMPLATES / "gpufleet-relay-send"),
                  dest=RELAY_SENDER, mode="755", user="root", group="root")


def stage(name, src, dest, files, mode="444"):
    """
    Stage ``files`` into ``dest``: from the control node (``staged``), or from this host's seed
    (``relayed``). Every host passes through ``staged``, a no-op on a pulling host, so pyinfra
    orders the seed's copy before any pull from it. Returns the operation that brings the files.
    """
    seed = relay_seed()
    direct = staged(name=name, src=src, dest=dest, files=files, mode=mode, pulled_from=seed and seed.name)
    if seed is None:
        return direct
    return relayed(name=f"{name} (from {seed.name})", seed=seed, dest=dest, files=files, mode=mode)


def relay_key():
    """A one-run Ed25519 key pair: (OpenSSH private key bytes, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    return private, key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def authorized_line(public, marker, expiry):
    """The seed's authorized_keys line: only the relay sender, no forwarding or pty, until ``expiry``
    (YYYYMMDDHHMM, the seed's local time: sshd reads it so)."""
    return f'restrict,command="{RELAY_SENDER}",expiry-time="{expiry}" {public} {marker}'


def _relay(state, host, shell, seed, keys_dir, dest, wanted, send, mode):
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
    expiry = seed_login.run("umask 077 && mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && "
                            "date -d '+1 hour' +%Y%m%d%H%M")[0]
    try:
        # Hosts pulling at once edit the seed's authorized_keys under one lock: no line is lost.
        seed_login.send(f"flock {RELAY_LOCK} sh -c 'cat >> ~/.ssh/authorized_keys'",
                        authorized_line(public, marker, expiry) + "\n")
        shell.send(f"umask 077 && mkdir -p {shlex.quote(keys_dir)} && cat > {keys}", private)
        known = address if port == 22 else f"[{address}]:{port}"
        shell.send(f"umask 077 && cat > {keys}.known", f"{known} {key_type} {host_key}\n")
        plan = "".join(f"{offset} {wanted[path]['size']} {wanted[path]['sha256']} {path}\n"
                       for path, offset in sorted(send.items()))
        pull = (f"ssh -i {keys} -o BatchMode=yes -o IdentitiesOnly=yes -o UserKnownHostsFile={keys}.known "
                f"-o StrictHostKeyChecking=yes -p {port} {shlex.quote(seed.data.get('ssh_user') or 'root')}@"
                f"{shlex.quote(address)} {shlex.quote(dest)} | {_receive_command(dest, mode)}")
        status, lines, stderr = shell.stream(pull, [plan.encode()])
    finally:
        seed_login.run(f"flock {RELAY_LOCK} sed -i '/ {marker}$/d' ~/.ssh/authorized_keys")
        shell.run(f"rm -f {keys} {keys}.known")
    size = sum(wanted[path]["size"] - offset for path, offset in send.items())
    _check_stream(host, dest, status, lines, len(send), stderr, f"up to {size}")
    _write_record(shell, dest, wanted)
    logger.info(f"[{host.name}] relayed {len(send)} file(s), {size} bytes, from {seed.name} into {dest}")


@operation()
def relayed(seed, dest, files, mode="444"):
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
    yield f"mkdir -p {shlex.quote(dest)}"
    logger.info(f"[{host.name}] {dest}: {len(intact)} intact, {len(send)} to pull from {seed.name}")
    keys_dir = posixpath.join(host.data.gpufleet_state_dir, "relay")
    yield HostFunction(_relay, [seed, keys_dir, dest, files, dict(send), mode], {})
