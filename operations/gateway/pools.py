"""
The gateway's pools, read from the inventory (pure): each service name that hosts of the run serve
behind a TLS front (``proxy_port``) is one pool of every such host, reached by the gateway at the
host's site address and the front's port; its keys are the service's ``api_key_file``, which every
host of the pool must name with the same keys.
"""

from pathlib import Path

from operations.core.errors import ConfigError


def member_address(name, data):
    """Where the gateway reaches a host: its site address, its SSH address, or its inventory name."""
    return data.get("gpufleet_site_address") or data.get("ssh_hostname") or name


def pools(hosts):
    """
    ``{service: {"api_key_file": path, "members": [{"host", "address", "port"}, ...]}}`` for ``hosts``
    (``(name, data)`` pairs, data as a dict), in inventory order; a service whose hosts name
    different keys is refused, naming them.
    """
    found = {}
    for name, data in hosts:
        for service in data.get("inference_services") or []:
            if not service.get("proxy_port"):
                continue
            pool = found.setdefault(service["name"], {"api_key_file": service.get("api_key_file"), "members": []})
            if _keys(pool["api_key_file"]) != _keys(service.get("api_key_file")):
                raise ConfigError(
                    "inference_services",
                    f"service {service['name']}: {name}'s api_key_file holds other keys than "
                    f"{pool['members'][0]['host']}'s; the gateway's pool {service['name']} needs one set of keys",
                    host=name,
                )
            pool["members"].append({"host": name, "address": member_address(name, data), "port": service["proxy_port"]})
    return found


def rag_stack(hosts, gateway):
    """
    The RAG stack the gateway ``gateway`` serves (``rag_gateway_port``): ``{"host", "address", "port",
    "gateway_port"}`` of the one host of ``rag_hosts`` that asks for it, reached at its TLS front
    (``rag_front_port``): on the host's own loopback when it is the gateway itself and its front
    listens there (or everywhere); None when no host asks. ``hosts``: ``(name, data, groups)``. Two
    such hosts are refused: each stack has its own accounts and documents, one URL cannot serve both.
    """
    exposed = [(name, data) for name, data, groups in hosts if "rag_hosts" in groups and data.get("rag_gateway_port")]
    if len(exposed) > 1:
        raise ConfigError(
            "rag_gateway_port",
            f"set on {', '.join(name for name, _ in exposed)}: the gateway serves one RAG stack (each has its "
            "own accounts and documents); set it on one host of rag_hosts",
        )
    if not exposed:
        return None
    name, data = exposed[0]
    listen = data.get("inference_listen") or "127.0.0.1"
    if name != gateway:
        address = member_address(name, data)
    else:
        address = "127.0.0.1" if listen in ("0.0.0.0", "::") else listen
    return {"host": name, "address": address, "port": data["rag_front_port"], "gateway_port": data["rag_gateway_port"]}


def _keys(path):
    return sorted(Path(path).read_text().split()) if path and Path(path).is_file() else None


def key_file_content(path):
    """The pool's keys as the gateway reads them: one per line."""
    return ("\n".join(_keys(path) or []) + "\n").encode()
