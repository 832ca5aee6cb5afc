"""JSON configuration files (Docker's daemon.json and its kin): the fact that reads one, and the
operation that merges settings into one without dropping what is already there."""

import json
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, operation
from pyinfra.operations import files

from operations.core.errors import HostStateError

MISSING = "__gpufleet_missing__"


class JsonFile(FactBase):
    """
    Returns a JSON file's parsed content, ``None`` when absent, or ``{"__invalid__": reason}``.

    .. code:: python

        {"log-driver": "json-file", "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}}
    """

    def command(self, path):
        path = shlex.quote(path)
        return f"if [ -f {path} ]; then cat {path}; else echo {MISSING}; fi"

    def process(self, output):
        text = "\n".join(output)
        if text.strip() == MISSING:
            return None
        if not text.strip():
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            return {"__invalid__": f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"}
        if not isinstance(value, dict):
            return {"__invalid__": "not a JSON object"}
        return value


def deep_merge(current, settings):
    """Return ``current`` with ``settings`` merged in; nested objects merge, other values replace."""
    merged = dict(current)
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render(value):
    """The layout nvidia-ctk writes too (4 spaces, sorted keys), so the two never fight over bytes."""
    return json.dumps(value, indent=4, sort_keys=True) + "\n"


def read(path):
    """The host's JSON object in ``path`` (None when absent); invalid JSON is refused, naming the file."""
    current = host.get_fact(JsonFile, path=path)
    if current and "__invalid__" in current:
        raise HostStateError(f"{host.name}: {path}: {current['__invalid__']}; fix or remove it, nothing was changed")
    return current


@operation()
def merged(path: str, settings: dict, mode: str = "644"):
    """
    Merge ``settings`` into the JSON object in ``path``, keeping every other key.

    + path: the JSON file on the host (created when absent)
    + settings: dict of keys to set; nested dicts are merged, not replaced
    + mode: file mode when written

    A file that holds invalid JSON is refused with an error naming it, and left untouched.

    .. code:: python

        json_ops.merged(
            name="Set Docker log rotation",
            path="/etc/docker/daemon.json",
            settings={"log-driver": "json-file", "log-opts": {"max-size": "50m"}},
        )
    """
    current = read(path)
    wanted = deep_merge(current or {}, settings)
    if current is not None and wanted == current:
        host.noop(f"{path} already holds {sorted(settings)}")
        return
    yield from files.put._inner(src=StringIO(render(wanted)), dest=path, mode=mode, user="root", group="root")
