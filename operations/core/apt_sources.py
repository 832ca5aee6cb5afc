"""apt sources a concern adds (the driver's, the toolkit's): their lines written one way, and apt's
lists updated only after a source changed."""

from pyinfra.operations import apt
from pyinfra.operations.util import any_changed


def local_line(directory: str) -> str:
    """A flat repository in a directory on the host (staged by gpufleet; trusted: it was verified then)."""
    return f"deb [trusted=yes] file:{directory} ./"


def signed_line(keyring: str, url: str) -> str:
    """A flat repository reached over the network, signed by the key in ``keyring``."""
    return f"deb [signed-by={keyring}] {url} /"


def update_after(what: str, changed: list) -> None:
    """``apt-get update`` once any of the ``changed`` operations (the source's key, list or files) changed."""
    if changed:
        apt.update(name=f"Update apt lists after the {what} source changed", _if=any_changed(*changed))
