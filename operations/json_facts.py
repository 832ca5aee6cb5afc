"""Facts that read JSON configuration files (Docker's daemon.json and its kin)."""

import json
import shlex

from pyinfra.api import FactBase

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
