"""The built-in lab: hosts started by ``python -m tests.lab up``, read from .lab/lab.json."""

import json
import os
from pathlib import Path

_LAB = Path(__file__).resolve().parent.parent / ".lab"
_ALL = json.loads((_LAB / "lab.json").read_text())["hosts"] if (_LAB / "lab.json").exists() else []
# lab-svc-1 is not deployed: it runs the site's registry and hub (tests/lab/site.py).
_SITE = next((h for h in _ALL if h.get("role") == "site"), None)
_STATE = {"hosts": [h for h in _ALL if h.get("role", "deploy") == "deploy"]}


def _ssh(host):
    """How the control node reaches a lab host: lab-1 and lab-gap-1 as the sudo user ``gpufleet``
    (root's SSH login is off there, as on Ubuntu's images), the others as root."""
    sudo = {"_sudo": True} if host["user"] != "root" else {}
    return {
        **sudo,
        "ssh_hostname": "127.0.0.1",
        "ssh_port": host["port"],
        "ssh_user": host["user"],
        "ssh_key": str(_LAB / "id_ed25519"),
        "ssh_known_hosts_file": "/dev/null",
        "ssh_strict_host_key_checking": "no",
        "gpufleet_site_address": host["address"],  # lab hosts reach each other on the lab network
        "gpufleet_tls_dir": str(_LAB / "site-tls"),  # the lab's site CA (made by the first TLS front)
    }


def _connected(host):
    """A lab-net-N host: deployed with no bundle, as a connected site's host is. Docker and the driver
    from Debian's archive over the network, the toolkit from the double repository staged from here,
    the llama.cpp image pulled from the site registry (TLS with the lab CA, a login), one weight
    volume fetched from the site's hub (a pinned commit, a token) and one staged from a directory
    here. Imported here, not in group_data: it needs the site's address."""
    from tests.lab import site

    address = _SITE["address"]
    image = site.image(address)
    service = {
        "engine": "llamacpp",
        "image": image,
        "memory": "1g",
        "args": ["--ctx-size", "256", "--threads", "1"],
        "api_key_file": str(_LAB / "secrets" / "chat-api-key"),
    }
    return {
        **_ssh(host),
        "gpufleet_bundle": None,
        "nvidia_toolkit_source": "local-repo",
        "nvidia_toolkit_local_repo_src": str(_LAB / "toolkit-repo"),
        "docker_registry_ca_files": {site.registry(address): str(site.CA_CERT)},
        "docker_registry_logins": {site.registry(address): str(site.LOGIN_FILE)},
        "docker_registry_mirrors": [f"https://{site.registry(address)}"],
        "inference_hf_endpoint": site.hub_endpoint(address),
        "inference_weight_volumes": {
            "hub-tiny": {"hf": site.HUB_REPO, "revision": site.hub_commit(), "token_file": str(site.HUB_TOKEN_FILE)},
            "dir-tiny": {"from": str(_LAB / "models" / "tiny")},
        },
        "inference_services": [
            {**service, "name": "chat", "model": "hub-tiny/tiny.gguf", "port": 8080},
            {**service, "name": "chat-dir", "model": "dir-tiny/tiny.gguf", "port": 8081},
        ],
    }


def _ubuntu(host):
    """A lab-ubu-N host: Ubuntu 24.04 to what gpufleet reads (os-release, a noble archive of test doubles
    carrying real package records, the generic kernel meta packages, a running 6.8.0-136-generic):
    Ubuntu's server driver of branch 580, as ubuntu-drivers picks it. No bundle: Docker from Debian's
    archive, the toolkit doubles staged from here. No inference service: it is here for its driver."""
    return {
        **_ssh(host),
        "gpufleet_bundle": None,
        "nvidia_driver_version": "580",
        "nvidia_toolkit_source": "local-repo",
        "nvidia_toolkit_local_repo_src": str(_LAB / "toolkit-repo"),
        "inference_services": [],
        **(_from_the_seed(host) if host["name"] == os.environ.get("GPUFLEET_LAB_SITE_FETCH") else {}),
    }


def _from_the_seed(host):
    """With GPUFLEET_LAB_SITE_FETCH=lab-ubu-1 (tests/e2e/test_connected.py): lab-ubu-1 stages from
    lab-net-1 (gpufleet_stage_via) and runs lab-net-1's two services, so their image comes as
    lab-net-1's archive and the hub volume as lab-net-1 fetched it, both over the site's relay
    (lab-ubu-1 has neither the registry's login and CA nor the hub's address), the directory volume
    through lab-net-1 too."""
    connected = _connected(host)
    return {
        "gpufleet_stage_via": "lab-net-1",
        "inference_services": connected["inference_services"],
        "inference_weight_volumes": connected["inference_weight_volumes"],
    }


def _behind_the_gateway(host):
    """With GPUFLEET_LAB_GATEWAY (tests/e2e/test_gateway.py): lab-1 and lab-2 serve the lab's chat behind
    TLS fronts on 8443, on every address, admitting each other only; lab-2 is the gateway, on 9443,
    admitting lab-ubu-1 (the client) only."""
    from group_data.lab import inference_services

    addresses = [h["address"] for h in _STATE["hosts"] if h["name"] in ("lab-1", "lab-2")]
    clients = [h["address"] for h in _STATE["hosts"] if h["name"] == "lab-ubu-1"]
    return {
        **_ssh(host),
        "inference_services": [{**service, "proxy_port": 8443} for service in inference_services],
        "inference_listen": "0.0.0.0",
        "inference_allowed_sources": addresses,
        "gateway_port": 9443,
        "gateway_allowed_sources": clients,
    }


def _watching(host):
    """With GPUFLEET_LAB_MONITORING (tests/e2e/test_monitoring.py): the monitoring host scrapes every 2 s
    and alerts after 6 s, so that a test sees an alert rise and clear in seconds."""
    return {"monitoring_scrape_interval": 2, "monitoring_alert_after": 6}


def _serving_people(host):
    """With GPUFLEET_LAB_RAG (tests/e2e/test_rag.py): the RAG stack beside the host's chat service:
    Open WebUI and Chroma's server (the lab's images of PyPI's open-webui and chromadb), chat and
    embeddings from two llama.cpp services of a real small model (Gemma 3 270M, from the bundle), the
    embedding service keyed (Open WebUI reads its key from a mounted file). The host is its own
    gateway too (gateway_hosts): Open WebUI is served on 8444 over TLS to the lab's network (where the
    control node's browser is), through the stack's TLS front on the host's loopback. A
    pretrained model that small answers from a short prompt: the RAG template and Open WebUI's own
    generation tasks (titles, tags, follow-ups, search queries) are set for it, and it answers at
    temperature 0, 48 tokens at most."""
    from group_data.lab import inference_services
    from tests.lab import rag

    gemma = {"engine": "llamacpp", "image": inference_services[0]["image"], "memory": "1g"}
    model = "gemma/gemma-3-270m-q4_k_m.gguf"
    common = ["--ctx-size", "2048", "--threads", "1"]
    return {
        "inference_services": [
            *inference_services,
            {
                **gemma,
                "name": "rag-chat",
                "model": model,
                "port": 8082,
                "args": [
                    *common,
                    "--jinja",
                    "--chat-template-file",
                    "/models/gemma/chat-template.jinja",
                    "--temp",
                    "0",
                    "--n-predict",
                    "48",
                ],
            },
            {
                **gemma,
                "name": "rag-embed",
                "model": model,
                "port": 8083,
                "api_key_file": str(_LAB / "secrets" / "chat-api-key"),
                "args": [*common, "--embeddings", "--pooling", "mean", "--batch-size", "2048", "--ubatch-size", "2048"],
            },
        ],
        "rag_webui_image": rag.image_tag("open-webui"),
        "rag_gateway_port": 8444,
        "gateway_port": 9443,
        "gateway_allowed_sources": [".".join(host["address"].split(".")[:2]) + ".0.0/16"],
        "rag_vector_db": "chroma",
        "rag_vector_db_image": rag.image_tag("chroma"),
        "rag_chat_service": "rag-chat",
        "rag_embedding_service": "rag-embed",
        "rag_admin_email": "admin@lab.test",
        "rag_admin_password_file": str(_LAB / "secrets" / "rag-admin-password"),
        "rag_webui_settings": {
            "RAG_TEMPLATE": "Document: {{CONTEXT}} Question: {{QUERY}}",
            "RAG_SYSTEM_CONTEXT": True,  # the document first, then the question
            "DEFAULT_MODELS": "rag-chat",
            "ENABLE_RETRIEVAL_QUERY_GENERATION": False,
            "ENABLE_TITLE_GENERATION": False,
            "ENABLE_TAGS_GENERATION": False,
            "ENABLE_FOLLOW_UP_GENERATION": False,
            "ENABLE_AUTOCOMPLETE_GENERATION": False,
        },
    }


def _data(host):
    data = _role_data(host)
    if host["name"] == os.environ.get("GPUFLEET_LAB_MONITORING"):
        data = {**data, **_watching(host)}
    if host["name"] == os.environ.get("GPUFLEET_LAB_RAG"):
        data = {**data, **_serving_people(host)}
    return data


def _role_data(host):
    if os.environ.get("GPUFLEET_LAB_GATEWAY") and host["name"] in ("lab-1", "lab-2"):
        return _behind_the_gateway(host)
    if host["name"].startswith("lab-ct-"):
        return _guest(host)
    if host["name"].startswith("lab-net-"):
        return _connected(host)
    if host["name"].startswith("lab-ubu-"):
        return _ubuntu(host)
    return _ssh(host)


def _guest(host):
    """A lab-ct-N host plays the LXC guest 101 of lab-pve-N (restarts allowed: the double records them)."""
    number = host["name"].rsplit("-", 1)[1]
    return {**_ssh(host), "proxmox_host": f"lab-pve-{number}", "proxmox_vmid": 101, "proxmox_guest_restart": True}


# lab-pve-N: a Proxmox VE host double (tests/fixtures/proxmox_double: pct, /etc/pve, a loaded
# module's /proc/devices and device nodes); it owns the kernel module and passes devices on.
proxmox_hosts = [(h["name"], _ssh(h)) for h in _STATE["hosts"] if h["name"].startswith("lab-pve-")]
# Every other lab host plays a GPU host (none has a GPU: the deploy says so and skips GPU steps).
gpu_hosts = [(h["name"], _data(h)) for h in _STATE["hosts"] if not h["name"].startswith("lab-pve-")]
# lab-ct-N: LXC guests of lab-pve-N: user-space driver at the host's version, toolkit without cgroups.
lxc_guests = [h["name"] for h in _STATE["hosts"] if h["name"].startswith("lab-ct-")]
# Air-gapped lab hosts: no route out; group_data/airgapped.py sends them to the bundle.
airgapped = [h["name"] for h in _STATE["hosts"] if h["airgapped"]]
# The site's gateway: none in the lab's default run; tests/e2e/test_gateway.py names one
# (GPUFLEET_LAB_GATEWAY=lab-2) for its runs, and the default run afterwards removes it; the RAG
# stack's host is its own gateway (GPUFLEET_LAB_RAG).
gateway_hosts = [
    h["name"]
    for h in _STATE["hosts"]
    if h["name"] in (os.environ.get("GPUFLEET_LAB_GATEWAY"), os.environ.get("GPUFLEET_LAB_RAG"))
]
# The site's monitoring: none in the lab's default run; tests/e2e/test_monitoring.py names one
# (GPUFLEET_LAB_MONITORING=lab-ubu-1) for its runs, and the default run afterwards removes it.
monitoring_hosts = [h["name"] for h in _STATE["hosts"] if h["name"] == os.environ.get("GPUFLEET_LAB_MONITORING")]
# The RAG stack: none in the lab's default run; tests/e2e/test_rag.py names a host (GPUFLEET_LAB_RAG=lab-gap-1)
# for its runs, and its last run, without it, removes the stack's units (its data stays).
rag_hosts = [h["name"] for h in _STATE["hosts"] if h["name"] == os.environ.get("GPUFLEET_LAB_RAG")]
