"""Root-only secret files: written 0600 from the first byte, never shown by --diff or in logs."""

import hashlib
import posixpath
import shlex
from io import BytesIO

from pyinfra import host
from pyinfra.api import FunctionCommand, operation
from pyinfra.facts.files import File, Sha256File

from .staging import run_checked


def _write(state, host, dest, content):
    tmp = f"{dest}.gpufleet-new"
    run_checked(host, f"umask 077 && install -m 600 -o root -g root /dev/null {shlex.quote(tmp)}")
    host.connector.get_file_transfer_connection().putfo(BytesIO(content), tmp)
    run_checked(host, f"mv -f {shlex.quote(tmp)} {shlex.quote(dest)}")


@operation()
def secret_file(dest, content):
    """
    Make ``dest`` hold ``content`` (bytes), mode 0600, owned by root, without ever showing it.

    + dest: path on the host, inside a root-only directory
    + content: the secret bytes

    Compared by SHA-256; --diff says only whether it changes.
    """
    current = host.get_fact(Sha256File, path=dest)
    if current == hashlib.sha256(content).hexdigest():
        info = host.get_fact(File, path=dest) or {}
        if info.get("mode") == 600 and info.get("user") == "root":
            host.noop(f"{dest} up to date (content not shown)")
        else:
            yield f"chmod 600 {shlex.quote(dest)} && chown root:root {shlex.quote(dest)}"
        return
    host.log(f"Will write secret {posixpath.basename(dest)} (content not shown)")
    yield FunctionCommand(_write, [dest, content], {})
