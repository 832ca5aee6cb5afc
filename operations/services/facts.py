"""Facts about a host's inference services: whether each answers now, the accounts and groups the
services' own accounts are chosen among, and the units gpufleet installed for services."""

import posixpath
import re
import shlex

from pyinfra.api import FactBase

from operations import TOOLS_DIR
from operations.services.names import UNIT_DIR


class ServiceReady(FactBase):
    """
    Returns whether a service's readiness endpoints answer now, from the host itself.

    .. code:: python

        {"ready": False, "reason": "http://127.0.0.1:8080/health not ready after 2 s (Connection refused)"}
    """

    def command(self, urls, key_file, key_var, ca_file=None):
        return (
            f"GPUFLEET_KEY_FILE={shlex.quote(key_file or '')} GPUFLEET_KEY_VAR={shlex.quote(key_var or '')} "
            f"GPUFLEET_CA_FILE={shlex.quote(ca_file or '')} "
            f"{TOOLS_DIR}/gpufleet-wait-ready 2 {' '.join(shlex.quote(u) for u in urls)} 2>&1 "
            "|| echo __not_ready__"
        )

    def process(self, output):
        if output and output[-1] == "__not_ready__":
            text = " ".join(output[:-1])
            reason = "not installed yet" if "not found" in text else text.replace("gpufleet-wait-ready: ", "")
            return {"ready": False, "reason": reason}
        return {"ready": True, "reason": ""}


class ServiceAccounts(FactBase):
    """
    Returns the host's accounts and groups by name, with their ids (``/etc/passwd``, ``/etc/group``).

    .. code:: python

        {"users": {"root": 0, "gpufleet-chat": 64100}, "groups": {"root": 0, "gpufleet-chat": 64100}}
    """

    def command(self):
        return "cut -d: -f1,3 /etc/passwd; echo --; cut -d: -f1,3 /etc/group"

    def process(self, output):
        found, table = {"users": {}, "groups": {}}, "users"
        for line in output:
            if line == "--":
                table = "groups"
            elif ":" in line:
                name, number = line.rsplit(":", 1)
                found[table][name] = int(number)
        return found


class InstalledServices(FactBase):
    """
    Returns the units gpufleet installed for inference services, read from their first line, by unit.

    .. code:: python

        {"gpufleet-chat.service": {"service": "chat", "proxy": False},
         "gpufleet-chat-proxy.service": {"service": "chat", "proxy": True}}
    """

    @staticmethod
    def default():
        return {}

    def command(self):
        return f"grep -m1 -H '^# Managed by gpufleet: ' {UNIT_DIR}/gpufleet-*.service 2>/dev/null || true"

    def process(self, output):
        units = {}
        for line in output:
            path, _, text = line.partition(":")
            match = re.match(  # a front's unit: "TLS front" since HAProxy, "proxy" before (stdlib Python)
                r"# Managed by gpufleet: (inference service|authenticating (?:TLS front|proxy) of inference "
                r"service) ([a-z0-9-]+)[ .]",
                text,
            )
            if match:
                units[posixpath.basename(path)] = {
                    "service": match.group(2),
                    "proxy": match.group(1).startswith("authenticating"),
                }
        return units
