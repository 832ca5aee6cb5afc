"""What a service's parts are called on a host, in one place: its unit, container and account share
``gpufleet-NAME``; its proxy's unit is ``gpufleet-NAME-proxy.service``; all units live in UNIT_DIR;
an engine's compile caches in CACHE_ROOT/NAME."""

UNIT_DIR = "/etc/systemd/system"
CACHE_ROOT = "/var/cache/gpufleet"


def managed_name(service_name: str) -> str:
    """A service's container, its account, and its unit without ``.service``: ``gpufleet-NAME``."""
    return f"gpufleet-{service_name}"


def unit_name(service_name: str) -> str:
    return f"{managed_name(service_name)}.service"


def proxy_unit_name(service_name: str) -> str:
    return f"{managed_name(service_name)}-proxy.service"


def unit_path(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}"


def cache_path(service_name: str) -> str:
    """The service's cache directory on the host (its account's, kept across restarts)."""
    return f"{CACHE_ROOT}/{service_name}"
