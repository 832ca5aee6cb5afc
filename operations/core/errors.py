"""Errors gpufleet raises before any host is changed."""

from pyinfra.api.exceptions import PyinfraError


class ConfigError(PyinfraError):
    """Bad input in inventory or group_data; names the field (and host) at fault."""

    def __init__(self, field, message, host=None):
        where = f"{host}: " if host else ""
        super().__init__(f"{where}{field}: {message}")
        self.field = field


class HostStateError(PyinfraError):
    """A host is in a state gpufleet refuses to build on (names the file or setting to fix)."""
