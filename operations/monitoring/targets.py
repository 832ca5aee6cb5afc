"""
What the site's Prometheus scrapes, read from the inventory (pure): every host's node exporter, each
engine served behind a TLS front (its own metrics, through the front), each gateway's HAProxy. The
answer is Prometheus' file-based discovery format, one list per job, written on the monitoring hosts
and rewritten when hosts or services change (Prometheus reads the files again by itself).
"""

import ipaddress
import re

from operations.core.errors import ConfigError
from operations.gateway.pools import member_address
from operations.services import engines

# Prometheus' jobs, in the order the configuration names them.
JOBS = ("node", "engines", "gateways", "gpus")


def monitoring_addresses(hosts):
    """The addresses the monitoring hosts scrape from (what the exporters' firewall admits), in
    inventory order; empty when no host of ``hosts`` is in ``monitoring_hosts``. Each must be an IP
    address: a firewall admits addresses, not names."""
    found = []
    for name, data, groups in hosts:
        if "monitoring_hosts" not in groups:
            continue
        address = member_address(name, data)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(
                "gpufleet_site_address",
                f"monitoring host {name} is reached at {address!r}: give its IP address (the exporters' "
                "firewall admits the monitoring hosts by address)",
                host=name,
            ) from None
        found.append(address)
    return found


def metrics_path(service):
    """Where ``service``'s engine serves its own metrics, or None (Ollama has none)."""
    return engines.ENGINES[service["engine"]].get("metrics")


def _target(address, port, labels):
    host_part = f"[{address}]" if ":" in address else address
    return {"targets": [f"{host_part}:{port}"], "labels": labels}


def scrape_targets(hosts, defaults):
    """
    ``{job: [{"targets": ["address:port"], "labels": {...}}, ...]}`` for ``hosts`` (``(name, data,
    groups)`` triples, data as a dict over ``defaults``): every host's node exporter; every service
    with a TLS front and an engine that has metrics (labels ``service`` and ``engine``); every gateway.
    """

    def setting(data, key):
        return data.get(key, defaults[key])

    found = {job: [] for job in JOBS}
    for name, data, groups in hosts:
        address = member_address(name, data)
        found["node"].append(_target(address, setting(data, "monitoring_node_exporter_port"), {"host": name}))
        for service in data.get("inference_services") or []:
            if service.get("proxy_port") and metrics_path(service):
                labels = {"host": name, "service": service["name"], "engine": service["engine"]}
                found["engines"].append(
                    _target(address, service["proxy_port"], {**labels, "__metrics_path__": metrics_path(service)})
                )
        if "gateway_hosts" in groups:
            port = setting(data, "monitoring_gateway_metrics_port")
            found["gateways"].append(_target(address, port, {"host": name}))
        if "gpu_hosts" in groups and setting(data, "monitoring_gpu_metrics"):
            port = setting(data, "monitoring_dcgm_exporter_port")
            found["gpus"].append(_target(address, port, {"host": name}))
    return found


def gpu_service_labels(hosts):
    """
    Prometheus' ``metric_relabel_configs`` for the gpus job: each GPU's series get the label
    ``service``, the gpufleet services that use that GPU (joined by commas), from each host's
    ``inference_services`` (``gpus``: "all", "none" or indices). Later rules win, so a GPU named by
    index carries the "all" services too.
    """
    rules = []
    for name, data, groups in hosts:
        if "gpu_hosts" not in groups:
            continue
        on_all, by_index = [], {}
        for service in data.get("inference_services") or []:
            gpus = service.get("gpus", "all")
            if gpus == "all":
                on_all.append(service["name"])
            elif gpus != "none":
                for index in gpus:
                    by_index.setdefault(str(index), []).append(service["name"])
        host_pattern = re.escape(name)
        if on_all:
            rules.append({"source_labels": ["host"], "regex": host_pattern, "replacement": ",".join(on_all)})
        for index, names in sorted(by_index.items()):
            rules.append(
                {
                    "source_labels": ["host", "gpu"],
                    "regex": f"{host_pattern};{index}",
                    "replacement": ",".join(on_all + names),
                }
            )
    return rules
