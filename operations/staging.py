"""
Stage files from the control node onto hosts over pyinfra's own SSH connection: resumable,
verified with SHA-256 on the host, and skipped in constant time when already there and intact.

On the host, each staged directory keeps ``.gpufleet-staged.json``: path -> [size, mtime, sha256]
of the files verified there. A file whose size and mtime still match its record is intact
without being read; anything else is hashed again (or sent again). An interrupted copy leaves
``<file>.gpufleet-part``; the next run appends to it instead of starting over.
"""

import json
import posixpath
import shlex
from io import BytesIO

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


def run_checked(host, command):
    """Run ``command`` on the host's connection (inside a FunctionCommand); raise if it fails."""
    status, output = host.connector.run_shell_command(command)
    if not status:
        raise OSError(f"{host.name}: {command}: {output.stderr}")
    return output.stdout_lines


def _transfer(state, host, src, dest, wanted, check, send, mode):
    """Run on the host's connection: hash what may be intact, append-send the rest, verify, record."""
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
    sftp = host.connector.get_file_transfer_connection()
    sent = 0
    for path, offset in sorted(send.items()):
        target = posixpath.join(dest, path)
        run_checked(host, f"mkdir -p {shlex.quote(posixpath.dirname(target))}")
        with open(f"{src}/{path}", "rb") as local, sftp.open(target + PART, "ab" if offset else "wb") as remote:
            remote.set_pipelined(True)
            local.seek(offset)
            for block in iter(lambda: local.read(CHUNK), b""):
                remote.write(block)
                sent += len(block)
        part = shlex.quote(target + PART)
        digest = run_checked(host, f"sha256sum -- {part}")[0].split()[0]
        if digest != wanted[path]["sha256"]:
            run_checked(host, f"rm -f -- {part}")
            raise OSError(f"{host.name}: {target}: SHA-256 after transfer differs from the manifest "
                          "(the source changed, or the copy was damaged); removed the partial copy")
        run_checked(host, f"chmod {mode} {part} && mv -f -- {part} {shlex.quote(target)}")
    facts = StagedFiles()
    on_host = facts.process(run_checked(host, facts.command(dest)))["files"]
    record = {path: [*stat, wanted[path]["sha256"]] for path, stat in on_host.items() if path in wanted}
    sftp.putfo(BytesIO(json.dumps(record, sort_keys=True).encode()), posixpath.join(dest, RECORD))
    logger.info(f"[{host.name}] staged {len(send)} file(s), {sent} bytes sent, into {dest}")


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
