"""Services the inventory no longer names, removed from the host: their units (proxies first), and for a
service gone entirely its container, secret files, caches and account. Images and weight volumes stay."""

import posixpath

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from operations.core import base, settings
from operations.services import auth_proxy
from operations.services.facts import InstalledServices
from operations.services.names import cache_path, managed_name, proxy_unit_name, unit_name, unit_path


def wanted_units(services):
    """The unit of each service, and of its proxy when it has a proxy_port (pure)."""
    units = {unit_name(service["name"]) for service in services}
    return units | {proxy_unit_name(service["name"]) for service in services if service.get("proxy_port")}


def stale_units(services):
    """The inference units on the host that ``services`` no longer name."""
    installed = host.get_fact(InstalledServices)
    wanted = wanted_units(services)
    return {unit: found for unit, found in installed.items() if unit not in wanted}


@deploy("Remove services the inventory no longer names", data_defaults=settings.DEFAULTS)
def remove_services(stale: dict, accounts: dict, secrets_dir: str | None = None):
    """
    Stop, disable and delete what gpufleet installed for services that are gone: their units
    (proxies first), and for a service gone entirely its container, secrets and account. Its image
    and weight volumes stay (other services, or a later one, may use them).

    + stale: unit -> ``{"service": name, "proxy": bool}`` (``stale_units``)
    + accounts: the host's accounts (``ServiceAccounts``)
    + secrets_dir: where the services' secret files are
    """
    secrets_dir = secrets_dir or base.secrets_dir()
    removed = []
    for unit, found in sorted(stale.items(), key=lambda item: not item[1]["proxy"]):
        systemd.service(
            name=f"Stop and disable {unit} (no longer in inference_services)",
            service=unit,
            running=False,
            enabled=False,
        )
        removed.append(files.file(name=f"Remove unit {unit}", path=unit_path(unit), present=False))
        if found["proxy"]:
            config = auth_proxy.config_path(found["service"])
            files.file(name=f"Remove {found['service']}'s front configuration {config}", path=config, present=False)
    for name in sorted({found["service"] for found in stale.values() if not found["proxy"]}):
        who = managed_name(name)
        server.shell(
            name=f"Remove container {who} if it is left", commands=[f"docker rm -f {who} >/dev/null 2>&1 || true"]
        )
        for suffix in ("env", "key"):
            files.file(
                name=f"Remove {name}'s {suffix} file",
                path=posixpath.join(secrets_dir, f"{name}.{suffix}"),
                present=False,
            )
        files.directory(name=f"Remove {name}'s caches", path=cache_path(name), present=False)
        if who in accounts["users"] or who in accounts["groups"]:
            server.shell(
                name=f"Remove account {who}",
                commands=[
                    f"if getent passwd {who} >/dev/null; then userdel {who}; fi; "
                    f"if getent group {who} >/dev/null; then groupdel {who}; fi"
                ],
            )
    if removed:
        systemd.daemon_reload(name="Reload systemd without the removed units", _if=any_changed(*removed))
