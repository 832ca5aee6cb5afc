"""Install apt packages at one pinned upstream version, held, with a preferences pin for their kin."""

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, operation
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import files

from operations.core import host_memo

# What apt's answers follow from: its sources, preferences and configuration, the package lists,
# dpkg's status (installed versions and holds) and architectures. A fact with ``state_files`` is
# asked again only when one of them changed (operations/core/fact_batch.py).
APT_STATE_FILES = (
    "/etc/apt",
    "/var/lib/apt/lists",
    "/var/lib/dpkg/status",
    "/var/lib/dpkg/updates",
    "/var/lib/dpkg/arch",
)


class AptHeldPackages(FactBase):
    """Returns the set of packages held with ``apt-mark hold``."""

    default = set
    state_files = APT_STATE_FILES

    def command(self):
        return "apt-mark showhold 2>/dev/null; true"

    def process(self, output):
        return {line.strip() for line in output if line.strip()}


APT_INSTALL = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    "--allow-downgrades --allow-change-held-packages "
    "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
)


def pin_file(patterns, version):
    """apt_preferences(5): every package matching ``patterns`` prefers ``version`` (above upgrades)."""
    return f"Package: {' '.join(patterns)}\nPin: version {version}-*\nPin-Priority: 1001\n"


def matches(installed_versions, version):
    """True when an installed Debian version is of the pinned upstream version (epoch ignored)."""
    return any(v.split(":", 1)[-1].startswith(f"{version}-") for v in installed_versions or [])


@operation()
def installed(
    packages: list[str],
    version: str,
    pin_name: str,
    pin_patterns: list[str] | None = None,
    unversioned: tuple | list = (),
    remove: tuple | list = (),
):
    """
    Install ``packages`` at upstream ``version``, hold them, and pin their kin to that version.

    + packages: package names to install and hold
    + version: upstream version, e.g. ``535.261.03`` (any Debian revision of it)
    + pin_name: file name under /etc/apt/preferences.d
    + pin_patterns: apt_preferences globs pinned with them (default: the packages)
    + unversioned: packages installed with them at whatever version apt picks, never held (Ubuntu's
      precompiled NVIDIA modules carry the kernel's version and must follow kernel upgrades)
    + remove: packages to take away (unheld first) when installed: a superseded way of doing the same

    A package installed at another version (a silent upgrade, a downgrade by hand) is moved back.
    """
    # asked before the pin is written (it changes neither): answered from the driver's own reading
    # of dpkg while nothing on the host has changed since (host_memo)
    current = host_memo.fact(DebPackages)
    held = host_memo.fact(AptHeldPackages)
    yield from files.put._inner(
        src=StringIO(pin_file(pin_patterns or packages, version)),
        dest=f"/etc/apt/preferences.d/{pin_name}",
        mode="644",
        user="root",
        group="root",
        create_remote_dir=False,  # apt ships /etc/apt/preferences.d
    )
    wrong = [name for name in packages if not matches(current.get(name), version)]
    absent = [name for name in unversioned if not current.get(name)]
    if wrong or absent:
        yield f"{APT_INSTALL} {' '.join(shlex.quote(name) for name in [*packages, *unversioned])}"
        held = set()  # an install that changes a held package takes its hold away: hold them all again
    unheld = sorted(set(packages) - held)
    if unheld:
        yield f"apt-mark hold {' '.join(shlex.quote(name) for name in unheld)}"
    stale = [name for name in remove if current.get(name)]
    if stale:
        quoted = " ".join(shlex.quote(name) for name in stale)
        yield f"apt-mark unhold {quoted} && DEBIAN_FRONTEND=noninteractive apt-get remove -y {quoted}"
    if not wrong and not absent and not unheld and not stale:
        with_modules = f"; {', '.join(unversioned)} installed" if unversioned else ""
        host.noop(f"{', '.join(packages)} at {version} and held{with_modules}")
