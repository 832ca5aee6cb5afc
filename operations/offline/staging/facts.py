"""What a staged directory holds on a host (``StagedFiles``), and the plan that follows from it."""

import json
import shlex

from pyinfra.api import FactBase

RECORD = ".gpufleet-staged.json"
PART = ".gpufleet-part"


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
        return (
            f"if [ -d {path} ]; then cd {path} && find . -type f ! -name {RECORD} -printf '%s %T@ %P\\n'; "
            f"echo '--record--'; cat {RECORD} 2>/dev/null || true; fi"
        )

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


class FreeSpace(FactBase):
    """
    Returns the bytes free to an unprivileged writer on the filesystem that holds ``path`` (or would:
    its nearest existing parent), and that filesystem's mount point.

    .. code:: python

        {"available": 52613349376, "mount": "/srv"}
    """

    def command(self, path):
        return f'p={shlex.quote(path)}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; df -P -B1 "$p" | tail -n 1'

    def process(self, output):
        fields = output[-1].split()
        return {"available": int(fields[3]), "mount": fields[5]}


def room_shortfall(host_name, dest, needed, free, margin):
    """The refusal when ``dest`` cannot take ``needed`` bytes plus ``margin`` (pure), or None."""
    if needed and needed + margin > free["available"]:
        return (
            f"{host_name}: {dest}: no room: {needed} bytes to receive + {margin} margin "
            f"(gpufleet_free_space_margin), {free['available']} free on {free['mount']}; nothing was sent. "
            "Free space there, or move gpufleet's directories"
        )
    return None


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
        if on_host and record and not rehash and record == [*on_host, entry["sha256"]] and on_host[0] == entry["size"]:
            intact.append(path)
        elif on_host and on_host[0] == entry["size"]:
            check.append(path)
        else:
            part = staged["parts"].get(path, 0)
            send[path] = part if part <= entry["size"] else 0
    return intact, check, send
