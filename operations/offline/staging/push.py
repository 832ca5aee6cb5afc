"""The staging operation: files from the control node onto the host, over pyinfra's own connection."""

import shlex

from pyinfra import host, logger
from pyinfra.api import operation
from pyinfra.api.exceptions import OperationError

from operations.core.checks import size_bytes
from operations.core.remote import HostFunction
from operations.offline.staging.facts import FreeSpace, StagedFiles, plan, room_shortfall
from operations.offline.staging.wire import transfer


@operation()
def staged(src: str, dest: str, files: dict, mode: str = "444", rehash: bool = False, pulled_from: str | None = None):
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
    resumed = sum(1 for offset in send.values() if offset)
    size = sum(files[path]["size"] - offset for path, offset in send.items())
    shortfall = room_shortfall(
        host.name, dest, size, host.get_fact(FreeSpace, path=dest), size_bytes(host.data.gpufleet_free_space_margin)
    )
    if shortfall:
        raise OperationError(shortfall)
    yield f"mkdir -p {shlex.quote(dest)}"
    logger.info(
        f"[{host.name}] {dest}: {len(intact)} intact, {len(check)} to verify, {len(send)} to send "
        f"({size} bytes{f', {resumed} resumed' if resumed else ''})"
    )
    yield HostFunction(transfer, [src, dest, files, check, dict(send), mode], {})
