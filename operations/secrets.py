"""Root-only secret files: written 0600 from the first byte, never shown by --diff or in logs."""

import hashlib
import posixpath
import shlex

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.files import File, Sha256File

from .remote import HostFunction, write_file_command


def _write(state, host, shell, dest, content):
    """The secret goes on the channel's stdin into a file that is 0600 from its first byte."""
    shell.send(write_file_command(dest, mode="600"), content)


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
    yield HostFunction(_write, [dest, content], {})
