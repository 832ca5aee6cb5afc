"""
Weight volume backup and restore, run as pyinfra operations from the command line:

    pyinfra INVENTORY operations.weights.backup.backed_up volume=NAME dest=DIR --limit HOST
    pyinfra INVENTORY operations.weights.backup.restored volume=NAME src=DIR --limit HOST

``backed_up`` copies the volume's files from the host into ``DIR/NAME`` on the control node (files
already there with the recorded size and SHA-256 are not copied again) and checks every copy
against the host's record of the volume (size and SHA-256, written when it was staged or fetched);
the manifest goes beside it, ``DIR/NAME.gpufleet-backup.json``. ``restored`` checks the copy against
that manifest (a damaged backup is refused before the host is touched), then stages it onto the
host like any weight volume: resumable, verified on the host, recorded for the services' check.
"""

import json
import posixpath
from datetime import UTC, datetime
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation
from pyinfra.api.exceptions import OperationError
from pyinfra.operations import files

from operations.offline import bundle
from operations.offline.staging.facts import StagedFiles
from operations.offline.staging.push import staged

MANIFEST_SUFFIX = ".gpufleet-backup.json"


def damaged(root, wanted):
    """The files of ``wanted`` (path -> size, sha256) that ``root`` on the control node lacks or holds
    with other bytes, by path (pure but for reading them)."""
    bad = []
    for path, info in sorted(wanted.items()):
        full = Path(root) / path
        if not full.is_file() or full.stat().st_size != info["size"] or bundle.sha256_file(full) != info["sha256"]:
            bad.append(path)
    return bad


def _checked(state, host, root, wanted, fetched, manifest_path, source):
    """Check the files just fetched (the others matched the record when the operation was planned),
    then write the manifest."""
    bad = damaged(root, {path: wanted[path] for path in fetched})
    if bad:
        logger.error(f"[{host.name}] backup of {source} in {root}: differs from the host's record: {', '.join(bad)}")
        return False
    Path(manifest_path).write_text(
        json.dumps(
            {
                "volume": Path(root).name,
                "host": host.name,
                "path": source,
                "taken": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": wanted,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    logger.info(f"[{host.name}] {source}: {len(wanted)} file(s) in {root}, each matching the host's record")
    return True


@operation()
def backed_up(volume: str, dest: str, weights_root: str | None = None):
    """
    Copy weight volume ``volume`` of the host into ``dest/volume`` on the control node, verified.

    + volume: the volume's name (a directory under ``inference_weights_root``)
    + dest: a directory on the control node
    + weights_root: where volumes live on the host (``inference_weights_root``)
    """
    weights_root = weights_root or host.data.inference_weights_root
    source = posixpath.join(weights_root, volume)
    record = host.get_fact(StagedFiles, path=source)["record"]
    if not record:
        raise OperationError(
            f"{host.name}: {source}: no record of staged or fetched weights there (is it a gpufleet weight volume?)"
        )
    wanted = {path: {"size": size, "sha256": digest} for path, (size, _, digest) in record.items()}
    root = Path(dest).resolve() / volume
    fetched = damaged(root, wanted)
    for path in fetched:
        yield from files.get._inner(
            src=posixpath.join(source, path), dest=str(root / path), create_local_dir=True, force=True
        )
    yield FunctionCommand(_checked, (root, wanted, fetched, f"{root}{MANIFEST_SUFFIX}", source), {})


@operation()
def restored(volume: str, src: str, weights_root: str | None = None):
    """
    Stage the backup ``src/volume`` (checked against ``src/volume.gpufleet-backup.json`` first) onto
    the host as weight volume ``volume``, verified; nothing is sent when the host's copy is intact.

    + volume: the volume's name
    + src: the directory on the control node ``backed_up`` wrote to
    + weights_root: where volumes live on the host (``inference_weights_root``)
    """
    weights_root = weights_root or host.data.inference_weights_root
    root = Path(src).resolve() / volume
    manifest_path = Path(f"{root}{MANIFEST_SUFFIX}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise OperationError(f"{manifest_path}: not a gpufleet backup manifest ({error}); nothing was sent") from None
    bad = damaged(root, manifest["files"])
    if bad:
        raise OperationError(
            f"{root}: the backup differs from its manifest ({', '.join(bad)}): damaged; nothing was sent"
        )
    yield from staged._inner(
        src=str(root), dest=posixpath.join(weights_root, volume), files=manifest["files"], mode="444"
    )
