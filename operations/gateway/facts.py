"""Facts a gateway host gives about its pools."""

from pyinfra.api import FactBase

from operations import TOOLS_DIR


class HeldOutServers(FactBase):
    """
    Returns the servers this gateway holds out of their pools by hand (``gpufleet-gateway-ctl held``:
    set to drain or maintenance through HAProxy's runtime API, as a drain that was not followed by
    its ready leaves them), by "pool/server". Empty where none is, where HAProxy does not run, or
    where gpufleet's tool is not installed yet.

    .. code:: python

        {"chat/lab-1": "drain"}
    """

    default = dict

    def command(self):
        tool = f"{TOOLS_DIR}/gpufleet-gateway-ctl"
        return f"! [ -x {tool} ] || {tool} held"

    def process(self, output):
        held = (line.split() for line in output)
        return {fields[0]: fields[1] for fields in held if len(fields) == 2 and "/" in fields[0]}
