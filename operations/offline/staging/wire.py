"""
The staging wire protocol: one framed stream per host on one SSH channel, read on the host by
templates/gpufleet-receive (sent inline with the command; nothing is installed for it).

Per file the sender writes a header line ``OFFSET COUNT TOTAL SHA256 PATH``, COUNT bytes, and for
a fresh copy a verdict line: its SHA-256 (established earlier in the run, the file unchanged since:
its bytes then go from the page cache into the OpenSSH client's pipe without passing through this
process; else hashed here as it is read), or ``host`` (a relay: hash it there). The receiver appends
to ``PATH.gpufleet-part``, checks size and digest, moves the file into place and prints ``ok PATH``
or ``bad PATH``. Afterwards the directory's record is rewritten.
"""

import hashlib
import json
import os
import posixpath
import shlex

import gevent
from pyinfra import logger

from operations import TEMPLATES
from operations.core.remote import FileSpan
from operations.offline.bundle import CHUNK, vouched_sha256
from operations.offline.staging.facts import RECORD, StagedFiles

# (host name, directory) -> whether this run changed a staged file's bytes there. A run that only
# re-hashes files whose mtime moved and re-records them changes no byte: what uses them (a serving
# container) has no reason to restart. See ``content_changed``.
_CONTENT_CHANGED = {}


def content_changed(host_name, dest):
    """True when staging changed bytes in ``dest`` on the host this run, False when it only checked
    and re-recorded files, None when no staging ran there."""
    return _CONTENT_CHANGED.get((host_name, dest))


def mark_content(host_name, dest, changed):
    _CONTENT_CHANGED[(host_name, dest)] = _CONTENT_CHANGED.get((host_name, dest), False) or bool(changed)


# The receiver's script without its comment lines: that is what travels in each staging command.
RECEIVER = "".join(
    line for line in (TEMPLATES / "gpufleet-receive").read_text().splitlines(True) if not line.startswith("#")
)


def frames(src, wanted, send, counter):
    """Yield the receiver's stream. A fresh file whose SHA-256 this run already established
    (``vouched_sha256``: the manifest was checked against it, and it has not changed since) goes as a
    ``FileSpan``, unread here; so does the rest of a resumed file (the host hashes it whole). Any
    other fresh file is hashed here as it is read and sent."""
    for path, offset in sorted(send.items()):
        entry = wanted[path]
        count = entry["size"] - offset
        yield f"{offset} {count} {entry['size']} {entry['sha256']} {path}\n".encode()
        with open(f"{src}/{path}", "rb") as local:
            if offset or vouched_sha256(local.name, os.fstat(local.fileno())) == entry["sha256"]:
                yield FileSpan(local, offset, count)
                counter[0] += count
                if not offset:
                    yield f"{entry['sha256']}\n".encode()
                continue
            digest, hashing = hashlib.sha256(), None
            for block in FileSpan(local, 0, count).blocks(CHUNK):
                if hashing:
                    hashing.get()
                # hashlib lets go of the GIL: the block is hashed on another core while it is sent
                hashing = gevent.get_hub().threadpool.spawn(digest.update, block)
                counter[0] += len(block)
                yield block
            if hashing:
                hashing.get()
            yield f"{digest.hexdigest()}\n".encode()


def receive_command(dest, mode):
    return f"perl -e {shlex.quote(RECEIVER)} {shlex.quote(dest)} {shlex.quote(mode)}"


def transfer(state, host, shell, src, dest, wanted, check, send, mode):
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

        def fresh_frames():
            sent[0] = 0
            return frames(src, wanted, send, sent)

        status, lines, stderr = shell.stream_bulk(receive_command(dest, mode), fresh_frames)
        check_stream(host, dest, status, lines, len(send), stderr, sent[0])
    write_record(shell, dest, wanted)
    mark_content(host.name, dest, send)
    logger.info(
        f"[{host.name}] staged {len(send)} file(s), {sent[0]} bytes sent"
        + (f" through {shell.bulk_transport}" if send else "")
        + f", into {dest}"
        + ("" if send else f"; {len(check)} moved file(s) hashed intact and re-recorded")
    )


def write_record(shell, dest, wanted):
    """Record size, mtime and SHA-256 of the wanted files now in ``dest``: the next run trusts them.
    Written aside and renamed into place, so a run killed meanwhile leaves the previous record whole."""
    facts = StagedFiles()
    on_host = facts.process(shell.run(facts.command(dest)))["files"]
    record = {path: [*stat, wanted[path]["sha256"]] for path, stat in on_host.items() if path in wanted}
    path = shlex.quote(posixpath.join(dest, RECORD))
    shell.send(f"cat > {path}.new && mv -f {path}.new {path}", json.dumps(record, sort_keys=True))


def check_stream(host, dest, status, lines, expected, stderr, sent):
    """Raise, naming the file, when the receiver reported a damaged copy or stopped early."""
    bad = [line[4:] for line in lines if line.startswith("bad ")]
    if bad:
        raise OSError(
            f"{host.name}: {dest}/{bad[0]}: SHA-256 after transfer differs from the manifest "
            "(the source changed, or the copy was damaged); removed the partial copy"
        )
    if status or len(lines) != expected:
        raise OSError(
            f"{host.name}: staging into {dest} stopped ({sent} bytes sent; the next run "
            f"resumes): {(lines or [''])[-1]} {stderr.strip()}"
        )
