"""
The RAG stack's data backup and restore, run as pyinfra operations from the command line:

    pyinfra INVENTORY operations.rag.backup.backed_up dest=DIR --limit HOST
    pyinfra INVENTORY operations.rag.backup.restored src=DIR --limit HOST

``backed_up`` stops the stack (Open WebUI, its front, the vector database: their SQLite databases
and index files are archived at rest, not mid-write), archives ``webui`` and ``vectordb`` of
``rag_data_dir`` on the host, starts again the units that ran (each start waits until ready: the
stack is away for the archive's time), and copies the archive into ``DIR/rag-stack.tar`` on the
control node, root-only there too (it holds accounts, chats and documents), checked against the
SHA-256 the host computed; the manifest goes beside it, ``DIR/rag-stack.gpufleet-backup.json``.
The host's copy is removed. ``restored`` checks the archive against that manifest first (a damaged
one is refused before the host is touched), stages it onto the host (resumable, verified there),
stops the stack, puts the archive's data in place, each part's files its account's on this host
(what was there is kept beside as ``webui.before-restore`` and ``vectordb.before-restore``), and
starts the stack again.
"""

import hashlib
import io
import json
import os
import posixpath
import shlex
from datetime import UTC, datetime
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation
from pyinfra.api.exceptions import OperationError
from pyinfra.facts.files import File

from operations.offline.staging.push import staged
from operations.rag import parts
from operations.rag.front import FRONT
from operations.services.names import managed_name, unit_name, unit_path

ARCHIVE = "rag-stack.tar"
MANIFEST = "rag-stack.gpufleet-backup.json"
PARTS = {"webui": parts.WEBUI, "vectordb": parts.VECTOR_DB}  # directory under rag_data_dir -> part
# the units in the order they start (systemd orders them too); stopping the first two stops the front
# too (PartOf Open WebUI)
UNITS = [unit_name(parts.VECTOR_DB), unit_name(parts.WEBUI), unit_name(FRONT)]
STOPPED = " ".join(UNITS[:2])


def work_dir(data_dir):
    """Where the host keeps an archive on its way (root only, beside the data)."""
    return posixpath.join(posixpath.dirname(data_dir.rstrip("/")), "rag-backup")


def _stack_here(data_dir):
    if not host.get_fact(File, path=unit_path(unit_name(parts.WEBUI))):
        raise OperationError(f"{host.name}: no RAG stack here ({unit_name(parts.WEBUI)} is not installed)")


def stop_archive_start(data_dir, outgoing):
    """The host's side of a backup (pure): the units that run are noted and stopped, the data archived,
    those units started again (even when the archive failed), then the archive and its SHA-256 handed
    to the login user (a root-only directory of its own: the copy is read over SFTP without sudo)."""
    archive, data = posixpath.join(outgoing, ARCHIVE), shlex.quote(data_dir)
    return (
        f'install -d -m 700 -o "${{SUDO_USER:-root}}" {shlex.quote(outgoing)} && '
        f"running=$(for unit in {' '.join(UNITS)}; do systemctl -q is-active $unit && echo $unit; done); "
        f"systemctl stop {STOPPED} && "
        f"tar --numeric-owner -C {data} -cf {archive}.part {' '.join(PARTS)}; archived=$?; "
        f'[ -z "$running" ] || systemctl start $running; '
        f"[ $archived -eq 0 ] && mv {archive}.part {archive} && "
        f"sha256sum {archive} | cut -d' ' -f1 > {archive}.sha256 && "
        f'chown "${{SUDO_USER:-root}}" {archive} {archive}.sha256 && chmod 400 {archive} {archive}.sha256'
    )


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetched(state, host, outgoing, dest, data_dir):
    """Copy the archive to the control node (0600 in a 0700 directory), check it against the host's
    SHA-256, write the manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    local, partial = dest / ARCHIVE, dest / f"{ARCHIVE}.part"
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_CREAT | os.O_WRONLY, 0o600))  # root-only before a byte arrives
    said = io.BytesIO()
    archive = posixpath.join(outgoing, ARCHIVE)
    if not host.get_file(f"{archive}.sha256", said) or not host.get_file(archive, str(partial)):
        logger.error(f"[{host.name}] {archive}: could not be copied to {dest}")
        return False
    expected, got = said.getvalue().decode().strip(), sha256_file(partial)
    if got != expected:
        logger.error(f"[{host.name}] {partial}: SHA-256 {got} differs from the host's {expected}: not kept")
        partial.unlink()
        return False
    partial.replace(local)
    manifest = {
        "host": host.name,
        "data_dir": data_dir,
        "taken": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {ARCHIVE: {"size": local.stat().st_size, "sha256": got}},
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.chmod(dest / MANIFEST, 0o600)
    logger.info(
        f"[{host.name}] RAG stack data of {data_dir}: {local} ({manifest['files'][ARCHIVE]['size']} bytes, checked)"
    )
    return True


@operation(is_idempotent=False)
def backed_up(dest: str, data_dir: str | None = None):
    """
    Archive the host's RAG stack data (the stack stopped meanwhile) into ``dest`` on the control node.

    + dest: a directory on the control node (``rag-stack.tar`` and its manifest go there)
    + data_dir: the stack's data on the host (``rag_data_dir``)
    """
    data_dir = data_dir or host.data.rag_data_dir
    _stack_here(data_dir)
    outgoing = posixpath.join(work_dir(data_dir), "outgoing")
    yield stop_archive_start(data_dir, outgoing)
    yield FunctionCommand(_fetched, (outgoing, str(Path(dest).expanduser().resolve()), data_dir), {})
    yield f"rm -rf {shlex.quote(outgoing)}"  # the host's copy, once the control node's is checked


def put_in_place(data_dir, incoming, owners):
    """The host's side of a restore (pure): the stack stopped, the archive unpacked beside the data,
    each part's directory swapped in (the one it replaces kept as NAME.before-restore), owned by its
    account (``owners``: directory -> account name); the stack started again whatever happened (a
    failed unpack leaves the data as it was), the command failing if the restore did."""
    data, archive = shlex.quote(data_dir), shlex.quote(posixpath.join(incoming, ARCHIVE))
    unpacked = shlex.quote(posixpath.join(data_dir, ".restoring"))
    swaps = " && ".join(
        f"rm -rf {data}/{name}.before-restore && "
        f"{{ [ ! -e {data}/{name} ] || mv {data}/{name} {data}/{name}.before-restore; }} && "
        f"mv {unpacked}/{name} {data}/{name} && chown -R {owner}:{owner} {data}/{name}"
        for name, owner in owners.items()
    )
    front = unit_path(unit_name(FRONT))
    return (
        f"systemctl stop {STOPPED} && rm -rf {unpacked} && mkdir -m 700 {unpacked} && "
        f"tar -C {unpacked} -xf {archive} && {swaps} && rmdir {unpacked}; restored=$?; "
        f"rm -rf {unpacked}; systemctl start {STOPPED} && "
        f"{{ [ ! -e {front} ] || systemctl start {unit_name(FRONT)}; }} && [ $restored -eq 0 ]"
    )


@operation(is_idempotent=False)
def restored(src: str, data_dir: str | None = None):
    """
    Put the RAG stack data of the backup in ``src`` (checked against its manifest first) in place on
    the host, and start the stack on it.

    + src: the directory ``backed_up`` wrote to, on the control node
    + data_dir: the stack's data on the host (``rag_data_dir``)
    """
    data_dir = data_dir or host.data.rag_data_dir
    src = Path(src).expanduser().resolve()
    try:
        manifest = json.loads((src / MANIFEST).read_text())
        wanted = manifest["files"][ARCHIVE]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OperationError(
            f"{src / MANIFEST}: not a RAG stack backup's manifest ({error}); nothing was sent"
        ) from None
    archive = src / ARCHIVE
    if not archive.is_file() or archive.stat().st_size != wanted["size"] or sha256_file(archive) != wanted["sha256"]:
        raise OperationError(f"{archive}: differs from its manifest (damaged or replaced); nothing was sent")
    _stack_here(data_dir)
    incoming = posixpath.join(work_dir(data_dir), "incoming")
    yield from staged._inner(src=str(src), dest=incoming, files={ARCHIVE: wanted}, mode="400")
    yield put_in_place(data_dir, incoming, {name: managed_name(part) for name, part in PARTS.items()})
    yield f"rm -rf {shlex.quote(incoming)}"
