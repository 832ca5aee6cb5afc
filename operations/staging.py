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
import shlex

import gevent
from pyinfra import host, logger
from pyinfra.api import FactBase, FunctionCommand, operation

from .bundle import CHUNK

RECORD = ".gpufleet-staged.json"
PART = ".gpufleet-part"


class StagedFiles(FactBase):
    """
    Returns what is in a staged directory: files with size and mtime, partial copies, the record.

    .. code:: python

        {"files": {"apt/x.deb": [1204, 1700000000]}, "parts": {"apt/y.deb": 4096},
         "record": {"apt/x.deb": [1204, 1700000000, "<sha256>"]}}
    """

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


# Runs on the host with stdin fed by ``_send``: per file a header line
# "OFFSET COUNT TOTAL SHA256 PATH", COUNT bytes appended to PATH.gpufleet-part, then (for a fresh
# copy) a verdict line from the sender. A resumed copy is hashed whole on the host. Prints
# "ok PATH" or "bad PATH"; a copy cut short keeps its part file for the next run and stops.
RECEIVE = r"""
cd "$1" || exit 1
while read -r offset count total digest path; do
  part="$path.gpufleet-part"
  case "$path" in */*) [ "${path%/*}" = "$made" ] || mkdir -p -- "${path%/*}" || exit 1; made=${path%/*};; esac
  copy="bs=1M count=$count iflag=count_bytes,fullblock status=none"
  if [ "$offset" -eq 0 ]; then
    dd of="$part" $copy || exit 1
    read -r verdict || exit 1
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


def run_checked(host, command):
    """Run ``command`` on the host's connection (inside a FunctionCommand); raise if it fails."""
    status, output = host.connector.run_shell_command(command)
    if not status:
        raise OSError(f"{host.name}: {command}: {output.stderr}")
    return output.stdout_lines


def _send(host, command, frames):
    """Run ``command`` on the host with ``frames`` (an iterable of bytes) as its stdin; return stdout lines."""
    channel = host.connector.client.get_transport().open_session()
    try:
        channel.exec_command(command)
        for frame in frames:
            try:
                channel.sendall(frame)
            except OSError:
                break  # the command stopped reading: its exit status and output say why
        else:
            channel.shutdown_write()
        stdout = channel.makefile("rb").read().decode()
        stderr = channel.makefile_stderr("rb").read().decode()
        status = channel.recv_exit_status()
    finally:
        channel.close()
    return status, stdout.splitlines(), stderr


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


def _transfer(state, host, src, dest, wanted, check, send, mode):
    """Run on the host's connection: hash what may be intact, stream the rest, verify, record."""
    hashes = {}
    if check:
        quoted = " ".join(shlex.quote(path) for path in check)
        for line in run_checked(host, f"cd {shlex.quote(dest)} && sha256sum -- {quoted}"):
            digest, path = line.split(None, 1)
            hashes[path.lstrip("*")] = digest
    for path in check:
        if hashes.get(path) != wanted[path]["sha256"]:
            logger.warning(f"[{host.name}] {dest}/{path}: SHA-256 differs from the manifest; sending it again")
            send[path] = 0
    sent = [0]
    if send:
        receive = f"sh -c {shlex.quote(RECEIVE)} gpufleet-receive {shlex.quote(dest)} {shlex.quote(mode)}"
        status, lines, stderr = _send(host, receive, _frames(src, wanted, send, sent))
        bad = [line[4:] for line in lines if line.startswith("bad ")]
        if bad:
            raise OSError(f"{host.name}: {dest}/{bad[0]}: SHA-256 after transfer differs from the manifest "
                          "(the source changed, or the copy was damaged); removed the partial copy")
        if status or len(lines) != len(send):
            raise OSError(f"{host.name}: staging into {dest} stopped ({sent[0]} bytes sent; the next run "
                          f"resumes): {(lines or [''])[-1]} {stderr.strip()}")
    facts = StagedFiles()
    on_host = facts.process(run_checked(host, facts.command(dest)))["files"]
    record = {path: [*stat, wanted[path]["sha256"]] for path, stat in on_host.items() if path in wanted}
    status, _, stderr = _send(host, f"cat > {shlex.quote(posixpath.join(dest, RECORD))}",
                              [json.dumps(record, sort_keys=True).encode()])
    if status:
        raise OSError(f"{host.name}: {dest}/{RECORD}: {stderr.strip()}")
    logger.info(f"[{host.name}] staged {len(send)} file(s), {sent[0]} bytes sent, into {dest}")


@operation()
def staged(src, dest, files, mode="444", rehash=False):
    """
    Make ``dest`` on the host hold ``files`` from ``src`` on the control node, verified.

    + src: directory on the control node (a bundle, or a part of one)
    + dest: directory on the host
    + files: path below ``src`` -> ``{"size": int, "sha256": str}`` (a manifest)
    + mode: file mode on the host (read-only by default)
    + rehash: hash every file on the host, even those whose record matches

    Extra files already in ``dest`` are left alone.
    """
    current = host.get_fact(StagedFiles, path=dest)
    intact, check, send = plan(files, current or {"files": {}, "parts": {}, "record": {}}, rehash)
    stale_record = current and set(current["record"]) - set(files)
    if not check and not send and not stale_record:
        host.noop(f"{dest}: {len(intact)} files intact")
        return
    yield f"mkdir -p {shlex.quote(dest)}"
    resumed = sum(1 for offset in send.values() if offset)
    size = sum(files[path]["size"] - offset for path, offset in send.items())
    logger.info(f"[{host.name}] {dest}: {len(intact)} intact, {len(check)} to verify, {len(send)} to send "
                f"({size} bytes{f', {resumed} resumed' if resumed else ''})")
    yield FunctionCommand(_transfer, [src, dest, files, check, dict(send), mode], {})
