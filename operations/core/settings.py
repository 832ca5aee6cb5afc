"""
gpufleet's settings and their defaults, read from the one place they are written:
group_data/all.py (plain literals, documented there).

pyinfra loads that file as group data for every host of an inventory beside deploy.py; the
concern deploys also take these values as their ``data_defaults``, so a deploy used from another
project's deploy file sees the same defaults. ``config.validate`` checks every key against them.
"""

import ast
from pathlib import Path

GROUP_DATA_ALL = Path(__file__).resolve().parents[2] / "group_data" / "all.py"
# gpufleet's own settings, by concern; other keys of all.py (pyinfra's ssh_ ones) are pyinfra's.
PREFIXES = ("gpufleet_", "docker_", "nvidia_", "inference_", "proxmox_", "gateway_", "monitoring_", "rag_")


def read(path=GROUP_DATA_ALL):
    """The gpufleet settings assigned in ``path`` (a group data file of literals), by name."""
    return read_source(Path(path).read_text(), filename=str(path))


def read_source(source, filename="<group data>"):
    """The gpufleet settings assigned in ``source`` (Python of literal assignments), by name."""
    tree = ast.parse(source, filename=filename)
    return {
        target.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if target.id.startswith(PREFIXES)
    }


DEFAULTS = read()
