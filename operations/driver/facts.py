"""Facts the NVIDIA driver's plan is made from: what apt offers, which kernels and kernel meta
packages are installed, which NVIDIA module a kernel has, and who nvidia-persistenced runs as."""

import re
import shlex

from pyinfra.api import FactBase

from operations.core.apt_pin import APT_STATE_FILES

ABI_IMAGE = re.compile(r"^linux-image-(?:unsigned-)?(\d+\.\d+\.\d+-\d+)-(.+)$")


def upstream(version):
    """The upstream part of a Debian version: ``1:580.173.02-0ubuntu0.24.04.1`` -> ``580.173.02``."""
    return version.split(":", 1)[-1].rsplit("-", 1)[0] if version else None


class AptPackages(FactBase):
    """
    Returns what apt knows of each package (``apt-cache policy`` and the candidate's record); a
    package apt does not know is left out:

    .. code:: python

        {"nvidia-smi": {"installed": "535.261.03-1", "candidate": "535.261.03-1",
                        "versions": ["535.309.01-0+deb12u1", "535.261.03-1"],
                        "section": "non-free/utils", "depends": "nvidia-alternative (= 535.261.03-1), ..."}}
    """

    default = dict
    state_files = APT_STATE_FILES

    def command(self, packages):
        # Every package in one policy call, then every version's record, the candidate's picked here:
        # ``apt-cache show --no-all-versions`` works out candidates with apt's whole dependency cache
        # (0.19 s on a lab host), plain ``show`` reads the records alone (0.03 s).
        names = " ".join(shlex.quote(name) for name in packages)
        return (
            f"apt-cache policy {names} 2>/dev/null; echo '@@ records'; "
            f"apt-cache show {names} 2>/dev/null | grep -E '^(Package|Version|Section|Depends):'; "
            "true"
        )

    def process(self, output):
        found, entry, in_table, records = {}, None, False, {}
        lines = iter(output)
        for line in lines:
            if line == "@@ records":
                records = _records(lines)
            elif re.match(r"^\S+:$", line):
                entry = found[line[:-1]] = {
                    "installed": None,
                    "candidate": None,
                    "versions": [],
                    "section": None,
                    "depends": "",
                }
                in_table = False
            elif entry is not None:
                field, _, value = line.strip().partition(": ")
                if field in ("Installed", "Candidate") and not in_table:
                    entry[field.lower()] = None if value.strip() == "(none)" else value.strip()
                elif line.strip() == "Version table:":
                    in_table = True
                elif in_table:
                    match = re.match(r"^ (?:\*\*\*| {3}) (\S+) (-?\d+)$", line)
                    if match and match.group(1) not in entry["versions"]:
                        entry["versions"].append(match.group(1))
        for name, entry in found.items():
            entry.update(records.get((name, entry["candidate"]), {}))
        return found


def _records(lines):
    """``{(package, version): {"section": ..., "depends": ...}}`` from ``apt-cache show``'s fields (in
    any order: dpkg's status file puts Section before Version), the first record of each version."""
    records, fields = {}, []
    for line in [*lines, "Package: "]:
        field, _, value = line.partition(": ")
        if field == "Package" and fields:
            record = dict(fields)
            key = (record.pop("package", None), record.pop("version", None))
            records.setdefault(key, record)
            fields = []
        if field in ("Package", "Version", "Section", "Depends"):
            fields.append((field.lower(), value.strip()))
    return records


class KernelImages(FactBase):
    """
    Returns the installed ``linux-image-*`` packages: ABI images by kernel release, and meta packages
    (``linux-image-generic``, ``linux-image-generic-hwe-24.04``) with the images they depend on:

    .. code:: python

        {"images": {"6.8.0-136-generic": "6.8.0-136.136"},
         "metas": {"generic": ["linux-image-6.8.0-136-generic"]}}
    """

    def default(self):
        return {"images": {}, "metas": {}}

    def command(self):
        return (
            "dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version} ${Depends}\\n' 'linux-image-*' "
            "2>/dev/null; true"
        )

    def process(self, output):
        found = self.default()
        for line in output:
            status, rest = line[:3], line[3:].lstrip()  # ${db:Status-Abbrev} is three characters: "ii "
            parts = rest.split(" ", 2)
            if status.strip() != "ii" or len(parts) < 2:
                continue
            name, version, depends = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
            abi = ABI_IMAGE.match(name)
            if abi:
                found["images"][f"{abi.group(1)}-{abi.group(2)}"] = version
            elif name.startswith("linux-image-"):
                found["metas"][name[len("linux-image-") :]] = [
                    item.strip().split(" ")[0]
                    for alternatives in depends.split(",")
                    for item in alternatives.split("|")
                    if item.strip().startswith("linux-image-")
                ]
        return found


def release_key(release):
    """Sort key of a kernel release ``6.8.0-136-generic``: (6, 8, 0, 136)."""
    return tuple(int(number) for number in re.findall(r"\d+", release.rsplit("-", 1)[0])[:4])


def image_meta(images):
    """
    The kernel meta flavour ubuntu-drivers would use (UbuntuDrivers/kerneldetection.py): the meta
    package of the newest installed kernel image; ``virtual`` counts as ``generic``. None without one.
    """
    if not images["images"]:
        return None
    newest = max(images["images"], key=release_key)
    for flavour, depends in sorted(images["metas"].items()):
        if f"linux-image-{newest}" in depends:
            return "generic" if flavour == "virtual" else flavour
    return None


class NvidiaModuleFor(FactBase):
    """
    Returns the NVIDIA kernel module a kernel would load (``modinfo -k``), under either name the
    packages give it (``nvidia``: Ubuntu, NVIDIA's repository; ``nvidia-current``: Debian), or None:

    .. code:: python

        {"module": "nvidia-current", "version": "535.261.03",
         "filename": "/lib/modules/6.1.0-56-amd64/updates/dkms/nvidia-current.ko"}
    """

    def command(self, kernel):
        kernel = shlex.quote(kernel)
        return (
            "for m in nvidia nvidia-current nvidia-current-open; do "
            f'v=$(modinfo -k {kernel} -F version $m 2>/dev/null) && [ -n "$v" ] && '
            f'echo "$m $v $(modinfo -k {kernel} -n $m 2>/dev/null)" && break; done; true'
        )

    def process(self, output):
        for line in output:
            parts = line.split()
            if len(parts) >= 2:
                return {"module": parts[0], "version": parts[1], "filename": parts[2] if len(parts) > 2 else None}
        return None


class PersistencedUser(FactBase):
    """Returns the user the installed nvidia-persistenced unit runs the daemon as (``--user``), or None."""

    def command(self):
        return (
            "for f in /etc/systemd/system/nvidia-persistenced.service /lib/systemd/system/nvidia-persistenced.service "
            "/usr/lib/systemd/system/nvidia-persistenced.service; do [ -f $f ] && grep -h '^ExecStart=.*--user' $f "
            "&& break; done; true"
        )

    def process(self, output):
        for line in output:
            match = re.search(r"--user[ =](\S+)", line)
            if match:
                return match.group(1)
        return None
