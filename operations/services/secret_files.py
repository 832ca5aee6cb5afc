"""Secret files: written with their final mode and owner from the first byte, never shown by --diff or in logs."""

import hashlib
import posixpath
import shlex

from pyinfra import host
from pyinfra.api import FactBase, operation
from pyinfra.facts.files import Sha256File

from operations.core.remote import HostFunction, write_file_command


class Ownership(FactBase):
    """Returns a file's mode and numeric owner, ``{"mode": "600", "uid": 0, "gid": 0}``, or None when absent."""

    def command(self, path):
        return f"stat -c '%a %u %g' {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output):
        if not output or not output[0].strip():
            return None
        mode, uid, gid = output[0].split()
        return {"mode": mode, "uid": int(uid), "gid": int(gid)}


def _write(state, host, shell, dest, content, mode, owner):
    """The secret goes on the channel's stdin into a file that has its mode from its first byte."""
    shell.send(write_file_command(dest, mode=mode, owner=owner), content)


def content_differs(dest, content):
    """Whether ``dest`` on the host does not hold ``content`` yet (by SHA-256; a mode or owner fix
    alone is not a new secret, so what reads it need not restart)."""
    return host.get_fact(Sha256File, path=dest) != hashlib.sha256(content).hexdigest()


@operation()
def secret_file(dest: str, content: bytes, mode: str = "600", uid: int = 0, gid: int = 0):
    """
    Make ``dest`` hold ``content`` (bytes) with ``mode``, owned by ``uid:gid``, without ever showing it.

    + dest: path on the host, inside a root-only directory
    + content: the secret bytes
    + mode: ``600`` (root reads it) or ``400`` for a service's own account
    + uid, gid: the owner (root by default; a service's account for a file its container reads)

    Compared by SHA-256; --diff says only whether it changes.
    """
    current = host.get_fact(Sha256File, path=dest)
    if current == hashlib.sha256(content).hexdigest():
        if host.get_fact(Ownership, path=dest) == {"mode": mode, "uid": uid, "gid": gid}:
            host.noop(f"{dest} up to date (content not shown)")
        else:
            yield f"chmod {mode} {shlex.quote(dest)} && chown {uid}:{gid} {shlex.quote(dest)}"
        return
    host.log(f"Will write secret {posixpath.basename(dest)} (content not shown)")
    yield HostFunction(_write, [dest, content, mode, f"{uid}:{gid}"], {})
