"""Benchmark inventory: the lab's first host runs the lab's llama.cpp service three times, on the
host network, on a bridge with a published port, and behind its TLS front (8443), and is the site's
gateway (9443) pooling that third one, for the streaming latency comparison (bench/latency.py).
Deployed with it, lab-1 serves these only (its lab service "chat" is removed until the lab inventory
is deployed again)."""

import ipaddress
import json
from pathlib import Path

from tests.lab.llamacpp import image_tag

_LAB = Path(__file__).resolve().parent.parent / ".lab"
_HOST = json.loads((_LAB / "lab.json").read_text())["hosts"][0]
_NETWORK = str(ipaddress.ip_network(f"{_HOST['address']}/16", strict=False))
_SERVICE = {
    "engine": "llamacpp",
    "image": image_tag(),
    "model": "tiny/tiny.gguf",
    "memory": "1g",
    "args": ["--ctx-size", "256", "--threads", "1"],
    "api_key_file": str(_LAB / "secrets" / "chat-api-key"),
}

_data = {
    "ssh_hostname": "127.0.0.1",
    "ssh_port": _HOST["port"],
    "ssh_user": _HOST["user"],
    **({"_sudo": True} if _HOST["user"] != "root" else {}),
    "ssh_key": str(_LAB / "id_ed25519"),
    "ssh_known_hosts_file": "/dev/null",
    "ssh_strict_host_key_checking": "no",
    "inference_listen": "0.0.0.0",  # the latency bench reaches the services from the control node (keyed)
    # ... through the lab network's gateway: the firewall admits the lab network (Docker gives it a /16)
    "inference_allowed_sources": [_NETWORK],
    "inference_services": [
        {**_SERVICE, "name": "chat-host", "port": 8080, "network": "host"},
        {**_SERVICE, "name": "chat-bridge", "port": 8081, "network": "bridge"},
        {**_SERVICE, "name": "chat-front", "port": 8082, "network": "host", "proxy_port": 8443},
    ],
    "gpufleet_site_address": _HOST["address"],  # the gateway reaches the front there
    "gpufleet_tls_dir": str(_LAB / "site-tls"),
    "gateway_port": 9443,
    "gateway_allowed_sources": [_NETWORK],
}
lab = [(_HOST["name"], _data)]  # group "lab": group_data/lab.py applies (bundle, toolkit source)
gpu_hosts = [_HOST["name"]]
gateway_hosts = [_HOST["name"]]
