"""
The gateway role's deploy: HAProxy from the distribution (Debian's ``haproxy.service``) with
gpufleet's ``/etc/haproxy/haproxy.cfg`` (templates/gpufleet-gateway.cfg.j2), the site's certificate,
each pool's keys in a root-only file, and the runtime API tool rolling restarts use
(templates/gpufleet-gateway-ctl). A change of pools, keys or certificate reloads HAProxy: requests in
flight finish on the old process.
"""

import posixpath
import shlex
from io import StringIO

from jinja2 import Template
from pyinfra import host, logger
from pyinfra.api import FactBase, deploy
from pyinfra.operations import apt, files, systemd

from operations import TEMPLATES, TOOLS_DIR
from operations.core import base, checks, settings
from operations.core.errors import ConfigError
from operations.core.site_hosts import site_hosts
from operations.gateway import pools as gateway_pools
from operations.monitoring.inventory import watchers
from operations.services import firewall, secret_files, site_tls

CONFIG = "/etc/haproxy/haproxy.cfg"
UNIT = "haproxy.service"
MARK = "# Managed by gpufleet: the site's gateway (gateway_hosts)."


class GatewayKeyFiles(FactBase):
    """
    Returns the pools' key files gpufleet wrote on this host as a gateway (``gateway-*.keys`` in the
    secrets directory) and whether ``/etc/haproxy/haproxy.cfg`` is gpufleet's gateway configuration.

    .. code:: python

        {"config": True, "keys": ["/etc/gpufleet/secrets/gateway-chat.keys"]}
    """

    @staticmethod
    def default():
        return {"config": False, "keys": []}

    def command(self, secrets_dir):
        return (
            f"head -1 {CONFIG} 2>/dev/null | grep -qxF {shlex.quote(MARK + ' Edits are overwritten.')} && echo __config__; "
            f"ls -1 {secrets_dir}/gateway-*.keys 2>/dev/null || true"
        )

    def process(self, output):
        return {"config": "__config__" in output, "keys": [line for line in output if line.endswith(".keys")]}


def keys_path(name):
    """Where the gateway keeps pool ``name``'s keys (root only)."""
    return posixpath.join(base.secrets_dir(), f"gateway-{name}.keys")


def config_text(
    pools, certificate, ca_file, port, listen, check_interval, max_bytes, timeout, metrics_port=None, rag=None
):
    """The gateway's HAProxy configuration for ``pools`` (each with its ``keys_at``: the key file on the
    gateway), with HAProxy's metrics on ``metrics_port`` when the site has monitoring hosts and the
    site's RAG stack on its own port when one is served (``pools.rag_stack``) (pure: unit-tested by
    running it)."""
    return Template(
        (TEMPLATES / "gpufleet-gateway.cfg.j2").read_text(), keep_trailing_newline=True, trim_blocks=True
    ).render(
        pools=pools,
        certificate=certificate,
        ca_file=ca_file,
        port=port,
        listen=listen,
        check_interval=check_interval,
        max_bytes=max_bytes,
        timeout=timeout,
        metrics_port=metrics_port,
        rag=rag,
    )


@deploy("Run the gateway", data_defaults=settings.DEFAULTS)
def install():
    """
    Install HAProxy and run it as the site's gateway: one pool per service served behind a TLS front
    by hosts of the inventory. Returns what host.json records of it.
    """
    if host.data.inference_firewall and not host.data.gateway_allowed_sources:
        raise ConfigError(
            "gateway_allowed_sources",
            "the gateway's port admits nobody: name the clients' addresses or networks "
            "(e.g. ['10.0.0.0/8']), or set inference_firewall = False to keep your own firewall",
            host=host.name,
        )
    site = site_hosts()  # the site's, not the --limit's
    pools = gateway_pools.pools([(name, data) for name, data, _ in site])
    rag = gateway_pools.rag_stack(site, host.name)
    if not pools:
        logger.warning(
            f"[{host.name}] gateway: no host of the inventory serves a service behind a TLS front "
            f"(proxy_port): the gateway answers 404 on port {host.data.gateway_port}"
        )
    if "gpu_hosts" not in host.groups:  # a GPU host's services deploy writes the table, the gateway's port in it
        firewall.admit_only_allowed(ports=[])
    tls = site_tls.install()
    apt.packages(name="Install HAProxy (the gateway)", packages=["haproxy"])
    files.put(
        name="Install the gateway's runtime API tool",
        src=str(TEMPLATES / "gpufleet-gateway-ctl"),
        dest=f"{TOOLS_DIR}/gpufleet-gateway-ctl",
        mode="755",
    )
    wanted_keys = {keys_path(name) for name in pools}
    for path in host.get_fact(GatewayKeyFiles, secrets_dir=base.secrets_dir())["keys"]:
        if path not in wanted_keys:
            files.file(name=f"Remove {path} (its pool is gone)", path=path, present=False)
    new_keys = []
    for name, pool in pools.items():
        content = gateway_pools.key_file_content(pool["api_key_file"])
        new_keys.append(secret_files.content_differs(keys_path(name), content))
        secret_files.secret_file(name=f"Write pool {name}'s keys (root only)", dest=keys_path(name), content=content)
    text = config_text(
        {name: {**pool, "keys_at": keys_path(name)} for name, pool in pools.items()},
        certificate=tls["pem_at"],
        ca_file=tls["ca_at"],
        port=host.data.gateway_port,
        listen=host.data.gateway_listen,
        check_interval=host.data.gateway_check_interval,
        max_bytes=checks.size_bytes(host.data.inference_max_request_bytes),
        timeout=host.data.inference_request_timeout,
        metrics_port=host.data.monitoring_gateway_metrics_port if watchers() else None,
        rag=rag,
    )
    serves_rag = f"; Open WebUI of {rag['host']} on {rag['gateway_port']}" if rag else ""
    config = files.put(
        name=f"Write {CONFIG} ({len(pools)} pool(s): {', '.join(pools) or 'none'}{serves_rag})",
        src=StringIO(text),
        dest=CONFIG,
        mode="644",
        user="root",
        group="root",
    )
    systemd.service(
        name=f"Reload {UNIT} after its pools, keys or certificate changed (requests in flight finish)",
        service=UNIT,
        reloaded=True,
        _if=lambda: config.did_change() or any(new_keys) or tls["changed"](),
    )
    systemd.service(name=f"Run {UNIT} on port {host.data.gateway_port}", service=UNIT, running=True, enabled=True)
    return {
        "gateway": {
            "port": host.data.gateway_port,
            "listen": host.data.gateway_listen,
            "ca_at": tls["ca_at"],
            "pools": {name: [member["host"] for member in pool["members"]] for name, pool in pools.items()},
            "rag": {"host": rag["host"], "port": rag["gateway_port"]} if rag else None,
        }
    }


@deploy("Remove the gateway", data_defaults=settings.DEFAULTS)
def remove_if_left():
    """A host no longer in ``gateway_hosts``: HAProxy stopped and disabled, gpufleet's configuration and
    the pools' keys removed (the package stays: the host's fronts may use it)."""
    found = host.get_fact(GatewayKeyFiles, secrets_dir=base.secrets_dir())
    if found["config"]:
        systemd.service(
            name=f"Stop and disable {UNIT} (no longer in gateway_hosts)", service=UNIT, running=False, enabled=False
        )
        files.file(name=f"Remove {CONFIG} (gpufleet's gateway)", path=CONFIG, present=False)
    for path in found["keys"]:
        files.file(name=f"Remove the gateway's key file {path}", path=path, present=False)
    files.file(name="Remove the gateway's runtime API tool", path=f"{TOOLS_DIR}/gpufleet-gateway-ctl", present=False)
    if found["config"] and "gpu_hosts" not in host.groups:
        firewall.admit_only_allowed(ports=[])  # no port left to guard: the table goes
