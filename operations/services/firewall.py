"""
The host firewall for inference ports: one nftables table of gpufleet's own (``inet gpufleet``)
that admits connections to the services' ports only from ``inference_allowed_sources`` and the
host itself, and refuses the rest with a TCP reset. It sits beside the host's other rules (Docker's,
ufw's, firewalld's): a packet must pass every table's hook, so this table only ever narrows.

Ports of services on the host network are filtered on the input hook; ports Docker publishes from
a bridge network on the forward hook, by the bridge and port the packet goes to (whether Docker
rewrote it or a LAN host routed it there directly), and by the original port of any other DNAT.
A boot unit loads the table before Docker starts and after nftables.service, and a drop-in of that
one loads it again after it starts or reloads (its stock file flushes the whole ruleset); the table carries the SHA-256 of the file
it came from, so a deploy sees whether what is loaded is what it wrote.
"""

import hashlib
import ipaddress
from io import StringIO

from jinja2 import Template
from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from operations import TEMPLATES
from operations.core import settings
from operations.core.site_hosts import site_hosts
from operations.gateway import pools as gateway_pools
from operations.monitoring.inventory import watchers

TABLE = "inet gpufleet"
RULES_FILE = "firewall.nft"  # in gpufleet_config_dir
UNIT = "gpufleet-firewall.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
# nftables.service's drop-in: its stock file flushes the ruleset, so gpufleet's table is loaded after it
DROP_IN = "/etc/systemd/system/nftables.service.d/gpufleet.conf"


class LoadedFirewall(FactBase):
    """
    Returns the digest the loaded ``inet gpufleet`` table carries in its comment, "" when the table
    has none, or None when no such table is loaded (or nft is not installed).

    .. code:: python

        "sha256:1f2e..."
    """

    requires_command = "nft"

    def command(self):
        return f"nft list table {TABLE} 2>/dev/null || echo __absent__"

    def process(self, output):
        if not output or output[-1] == "__absent__":
            return None
        for line in output:
            words = line.strip().split(" ", 1)
            if words[0] == "comment" and len(words) == 2:
                return words[1].strip('"')
        return ""


def sources_by_family(sources):
    """``inference_allowed_sources`` split into IPv4 and IPv6 networks, each family collapsed (a network
    inside another, or two adjacent ones, written once: an interval set refuses overlaps) (pure)."""
    networks = {ipaddress.ip_network(source, strict=False) for source in sources}
    return tuple(
        [str(n) for n in ipaddress.collapse_addresses(n for n in networks if n.version == version)]
        for version in (4, 6)
    )


def rules(ports, sources, others=()):
    """The nftables file for ``ports`` admitted from ``sources``, and each of ``others`` (``{"name",
    "ports", "sources", "comment"}``: the gateway's port from its clients, the exporters' from the
    monitoring hosts) from its own sources (pure: unit-tested with ``nft -c``). Its table comment is
    the SHA-256 of the rest, which the deploy compares with the loaded table's."""
    ipv4, ipv6 = sources_by_family(sources)
    rendered_others = []
    for other in others:
        other_ipv4, other_ipv6 = sources_by_family(other["sources"])
        rendered_others.append(
            {
                "name": other["name"],
                "comment": other["comment"],
                "ports": ", ".join(str(p) for p in sorted(set(other["ports"]))),
                "ipv4": ", ".join(other_ipv4),
                "ipv6": ", ".join(other_ipv6),
            }
        )
    body = Template(
        (TEMPLATES / "gpufleet-firewall.nft.j2").read_text(),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    ).render(
        table=TABLE,
        ports=", ".join(str(p) for p in sorted(set(ports))),
        ipv4=", ".join(ipv4),
        ipv6=", ".join(ipv6),
        others=rendered_others,
        digest="@DIGEST@",
    )
    digest = "sha256:" + hashlib.sha256(body.encode()).hexdigest()
    return body.replace("@DIGEST@", digest), digest


def _gpu_metrics():
    """Whether the monitoring hosts expect this host's GPU metrics (its port admitted, listened on or not)."""
    return "gpu_hosts" in host.groups and host.data.monitoring_gpu_metrics


def all_ports(others):
    return {port for other in others for port in other["ports"]}


def unit_text(rules_path):
    """The boot unit that loads ``rules_path`` (pure)."""
    return Template((TEMPLATES / f"{UNIT}.j2").read_text(), keep_trailing_newline=True).render(rules_path=rules_path)


def drop_in_text(rules_path):
    """nftables.service's drop-in that loads ``rules_path`` after its own file (pure)."""
    template = (TEMPLATES / "gpufleet-nftables-dropin.conf.j2").read_text()
    return Template(template, keep_trailing_newline=True).render(rules_path=rules_path)


def other_admissions(ports):
    """What this host admits besides its services' ports, each from its own sources: a gateway's ports
    (its own, and the RAG stack's it serves) from ``gateway_allowed_sources``; a RAG stack's TLS front
    from ``inference_allowed_sources``; with monitoring hosts in the inventory, the node exporter, the
    fronts (engines' metrics) and a gateway's metrics from the monitoring hosts. None without
    gpufleet's firewall (``inference_firewall``)."""
    if not host.data.inference_firewall:
        return []
    found = []
    if "gateway_hosts" in host.groups:
        rag = gateway_pools.rag_stack(site_hosts(), host.name)
        found.append(
            {
                "name": "gateway",
                "comment": "the site's gateway: its clients (gateway_allowed_sources)",
                "ports": [host.data.gateway_port, *([rag["gateway_port"]] if rag else [])],
                "sources": host.data.gateway_allowed_sources,
            }
        )
    if "rag_hosts" in host.groups and host.data.rag_gateway_port:
        found.append(
            {
                "name": "rag_front",
                "comment": "the RAG stack's TLS front: the gateway (inference_allowed_sources)",
                "ports": [host.data.rag_front_port],
                "sources": host.data.inference_allowed_sources,
            }
        )
    watching = watchers()
    if watching:
        fronts = [
            s["proxy_port"] for s in host.data.inference_services if s.get("proxy_port") and s["proxy_port"] in ports
        ]
        gateway = [host.data.monitoring_gateway_metrics_port] if "gateway_hosts" in host.groups else []
        gpu = [host.data.monitoring_dcgm_exporter_port] if _gpu_metrics() else []
        found.append(
            {
                "name": "monitoring",
                "comment": "metrics: the monitoring hosts (monitoring_hosts)",
                "ports": [host.data.monitoring_node_exporter_port, *fronts, *gateway, *gpu],
                "sources": watching,
            }
        )
    return found


@deploy("Admit inference ports only from the allowed sources", data_defaults=settings.DEFAULTS)
def admit_only_allowed(ports: list[int], sources: list[str] | None = None, config_dir: str | None = None):
    """
    Load the ``inet gpufleet`` table for ``ports`` (and, on a gateway, its port from
    ``gateway_allowed_sources``) and keep it loaded at boot; with neither, remove the table and its
    unit (nothing of gpufleet's is left to guard).

    + ports: every TCP port an inference service or its proxy listens on
    + sources: addresses and networks that may connect (``inference_allowed_sources``); the host
      itself always may
    + config_dir: where the rules file lives (``gpufleet_config_dir``)
    """
    sources = host.data.inference_allowed_sources if sources is None else sources
    config_dir = config_dir or host.data.gpufleet_config_dir
    rules_path = f"{config_dir}/{RULES_FILE}"
    others = other_admissions(ports)
    if not ports and not others:
        _remove(rules_path)
        return
    text, digest = rules(ports, sources, others)
    apt.packages(name="Install nftables", packages=["nftables"])
    rules_file = files.put(
        name=f"Write {rules_path} (ports {', '.join(str(p) for p in sorted({*ports, *all_ports(others)}))})",
        src=StringIO(text),
        dest=rules_path,
        mode="644",
        user="root",
        group="root",
    )
    unit = files.put(
        name=f"Install unit {UNIT}",
        src=StringIO(unit_text(rules_path)),
        dest=UNIT_PATH,
        mode="644",
        user="root",
        group="root",
        create_remote_dir=False,
    )
    drop_in = files.put(
        name=f"Install {DROP_IN} (the table loaded again after nftables.service flushes the ruleset)",
        src=StringIO(drop_in_text(rules_path)),
        dest=DROP_IN,
        mode="644",
        user="root",
        group="root",
    )
    systemd.daemon_reload(name=f"Reload systemd for {UNIT}", _if=any_changed(unit, drop_in))
    loaded = host.get_fact(LoadedFirewall)
    systemd.service(
        name=f"Load the rules ({UNIT}) after they changed, or when the loaded table is not theirs",
        service=UNIT,
        restarted=True,
        _if=lambda: rules_file.did_change() or unit.did_change() or loaded != digest,
    )
    systemd.service(name=f"Keep {UNIT} enabled at boot", service=UNIT, running=True, enabled=True)


def _remove(rules_path):
    """No service to guard: the unit, the rules file and the loaded table go (each only if there)."""
    systemd.service(name=f"Stop {UNIT}", service=UNIT, running=False, enabled=False)
    unit = files.file(name=f"Remove unit {UNIT} (no inference port to guard)", path=UNIT_PATH, present=False)
    drop_in = files.file(name=f"Remove {DROP_IN}", path=DROP_IN, present=False)
    systemd.daemon_reload(name=f"Reload systemd without {UNIT}", _if=any_changed(unit, drop_in))
    files.file(name=f"Remove {rules_path}", path=rules_path, present=False)
    if host.get_fact(LoadedFirewall) is not None:
        server.shell(name=f"Unload the nftables table {TABLE}", commands=[f"nft delete table {TABLE}"])
